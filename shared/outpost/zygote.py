"""Start services by forking one process that has already imported what they all import.

Why: every service imports the same things (pydantic, the settings of every section, paho, numpy,
its own modules): 60-90 MB of memory and a second or two of CPU each. Seven services each importing
them cost a gateway half a gigabyte and, on a small CPU, most of the stack's cold start. A *zygote*
(the name Android gives the same idea) imports them once and forks each service from itself: the
children share those pages with it (copy on write; :func:`gc.freeze` keeps the collector from
writing to them) and start without importing anything again. docs/deploy.md has the figures.

A forked service is what ``python -m MODULE`` would have been: its own process, session and
environment (given whole, as to ``exec``), its output on the pipe the supervisor reads, SIGTERM
when the zygote dies (which gets SIGTERM when the supervisor dies, even by kill -9), and its name
in ``ps`` (``outpost: ingest``). A module the zygote cannot import is skipped there; its service
then fails in its own process with its own error, as it would have without the zygote.

The two sides talk over a Unix socket (``SOCK_SEQPACKET``: one JSON message per packet, the
child's output pipe passed along with the request):

- supervisor -> zygote: ``{"id": n, "name": ..., "module": ..., "env": {...}}`` + the pipe's fd;
- zygote -> supervisor: ``{"id": n, "pid": pid}`` (or ``"error"``), and ``{"exit": pid, "code": c}``
  for each child it reaps (``c`` as :attr:`subprocess.Popen.returncode`: negative for a signal).

The zygote is single-threaded (forking a process with threads can copy a lock that some thread
held); the supervisor's side (:class:`Zygote`) is thread-safe. What it imports must not start a GPU
context (a CUDA context does not survive a fork): the inference service imports TensorRT and pycuda
when it first builds or loads an engine, in its own process (tests/unit/test_preload.py checks).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from setproctitle import setproctitle

from outpost.log import get_logger
from outpost.process import die_with_parent, end_process

log = get_logger("outpost.zygote")

MAX_MESSAGE = 1 << 20
"""The largest request (a service's whole environment) or reply."""
START_TIMEOUT_S = 120.0
"""How long the zygote may take to import what it preloads and say it is ready."""


class ZygoteError(RuntimeError):
    """The zygote could not be started or could not fork a service."""


# ---------------------------------------------------------------------------------------------
# the zygote's side: python -m outpost.zygote FD MODULE...


def _exit_code(exc: SystemExit) -> int:
    """What ``python`` exits with for ``SystemExit(code)``."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _run_child(name: str, module: str, env: dict[str, str], out: int, zygote: int) -> None:
    """In the forked child: become ``python -m module`` and never return."""
    code = 1
    try:
        os.setsid()
        die_with_parent(zygote)()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        os.environ.clear()
        os.environ.update(env)
        setproctitle(f"outpost: {name}")
        sys.argv = [module]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # noqa: BLE001 - what python would print for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        _exit_as_python_does(code)


def _exit_as_python_does(code: int) -> None:
    """End the child as the interpreter ends ``python -m``: wait for its non-daemon threads, run
    its atexit functions (logging's flush among them), flush, exit; never back into the zygote's
    loop."""
    try:
        me = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not me and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _fork(request: dict[str, Any], out: int, close: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        for fd in close:
            with contextlib.suppress(OSError):
                os.close(fd)
        _run_child(str(request["name"]), str(request["module"]), dict(request["env"]), out, zygote)
    return pid


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(orjson.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}))


def serve(sock: socket.socket) -> None:
    """Fork a service for each request until the supervisor closes its end; report each exit."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd is what matters
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says when to stop
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    sock.send(orjson.dumps({"ready": os.getpid()}))
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is sock:
                msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
                if not msg:
                    return  # the supervisor is gone; the children get SIGTERM as this exits
                request = orjson.loads(msg)
                try:
                    if len(fds) != 1:
                        raise ZygoteError(f"expected one output fd, got {len(fds)}")
                    pid = _fork(request, fds[0], [sock.fileno(), wake_r, wake_w, sel.fileno()])
                    reply: dict[str, Any] = {"id": request["id"], "pid": pid}
                except (OSError, ZygoteError, KeyError, TypeError) as exc:
                    reply = {"id": request.get("id"), "error": str(exc)}
                finally:
                    for fd in fds:
                        os.close(fd)
                sock.send(orjson.dumps(reply))
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        _reap(sock)


def _preload(spec: str) -> None:
    """Import ``spec``: a module, or ``@module:attr`` for the modules that ``module.attr`` names
    (its values if it is a dict), for a caller that should not import ``module`` itself first."""
    try:
        if not spec.startswith("@"):
            importlib.import_module(spec)
            return
        module, _, attr = spec[1:].partition(":")
        named: Any = importlib.import_module(module)
        for part in attr.split("."):
            named = getattr(named, part)
        for each in named.values() if isinstance(named, dict) else named:
            _preload(str(each))
    except Exception as exc:  # noqa: BLE001 - its service will fail with its own error
        print(f"zygote: not preloading {spec}: {exc!r}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[0]))
    setproctitle("outpost: zygote")
    for spec in argv[1:]:
        _preload(spec)
    gc.collect()
    gc.freeze()  # what is imported now stays shared: the collector never writes to it
    # the supervisor may be gone already: a command that failed before it needed the services
    with contextlib.suppress(ConnectionError):
        serve(sock)


# ---------------------------------------------------------------------------------------------
# the supervisor's side


@dataclass
class Forked:
    """A service forked by the zygote: what the supervisor needs of :class:`subprocess.Popen`."""

    pid: int
    stdout: IO[bytes]
    returncode: int | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()


def _orphan_gone(pid: int) -> int | None:
    """A child of a zygote that died: its exit code once it is gone (the zygote never reported it),
    None while it runs. It is ours to reap where this process is PID 1 (a container's), the init's
    otherwise."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None
    except ChildProcessError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return -signal.SIGTERM  # what its zygote's death sent it (PR_SET_PDEATHSIG)
        return None


@dataclass
class Zygote:
    """The supervisor's handle on its zygote: started on first use, started again if it dies."""

    preload: list[str]
    env: dict[str, str]
    preexec: Callable[[], None] | None = None
    """Run in the zygote between fork and exec (:func:`outpost.process.die_with_parent`)."""
    _proc: subprocess.Popen[bytes] | None = None
    _sock: socket.socket | None = None
    _ready: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    _replied: threading.Condition = field(default_factory=threading.Condition)
    _children: dict[int, Forked] = field(default_factory=dict)
    _next_id: int = 0

    @property
    def pid(self) -> int | None:
        """The zygote's process, while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def spawn(self, name: str, module: str, env: dict[str, str]) -> Forked:
        """Fork ``python -m module`` as service ``name``; its output on the returned pipe."""
        read, write = os.pipe()
        try:
            with self._lock:
                sock = self._ensure()
                self._next_id += 1
                ident = self._next_id
                request = {"id": ident, "name": name, "module": module, "env": env}
                socket.send_fds(sock, [orjson.dumps(request)], [write])
            reply = self._reply(ident)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        if "pid" not in reply:
            os.close(read)
            raise ZygoteError(f"the zygote could not start {name}: {reply.get('error')}")
        child = Forked(int(reply["pid"]), os.fdopen(read, "rb"))
        with self._replied:
            early = self._replies.pop(-child.pid, None)  # it exited before we got here
            if early is not None:
                child.exited(int(early["code"]))
            else:
                self._children[child.pid] = child
        return child

    def _reply(self, ident: int) -> dict[str, Any]:
        with self._replied:
            if not self._replied.wait_for(lambda: ident in self._replies, timeout=START_TIMEOUT_S):
                raise ZygoteError("the zygote did not answer")
            return self._replies.pop(ident)

    def start(self) -> Zygote:
        """Start the zygote without waiting for it: it imports while the caller goes on (the first
        :meth:`spawn` waits for it to be ready)."""
        with self._lock:
            if self.pid is None:
                self._launch()
        return self

    def _launch(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "outpost.zygote", str(theirs.fileno()), *self.preload],
                env=self.env,
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                preexec_fn=self.preexec,  # noqa: PLW1509 - one prctl call, no locks
            )
        finally:
            theirs.close()
        self._sock, self._ready = ours, False

    def _ensure(self) -> socket.socket:
        """The socket of a zygote that is ready, started (again) if need be (under ``_lock``)."""
        if self.pid is None or self._sock is None:
            self._launch()
        assert self._proc is not None and self._sock is not None
        if self._ready:
            return self._sock
        sock, proc = self._sock, self._proc
        sock.settimeout(START_TIMEOUT_S)
        try:
            hello = orjson.loads(sock.recv(MAX_MESSAGE) or b"{}")
        except (OSError, orjson.JSONDecodeError) as exc:
            hello = {"error": str(exc)}
        if "ready" not in hello:
            sock.close()
            self._sock = None
            proc.kill()
            proc.wait()
            raise ZygoteError(f"the zygote did not start: {hello.get('error', 'it exited')}")
        sock.settimeout(None)
        self._ready = True
        threading.Thread(target=self._listen, args=(sock, proc), name="zygote", daemon=True).start()
        log.info("zygote ready", extra={"pid": proc.pid, "preloaded": len(self.preload)})
        return sock

    def _listen(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """Replies and exits from one zygote, until it is gone; then its orphans, until they are."""
        while True:
            try:
                msg = sock.recv(MAX_MESSAGE)
            except OSError:
                msg = b""
            if not msg:
                break
            doc = orjson.loads(msg)
            with self._replied:
                if "exit" in doc:
                    child = self._children.pop(int(doc["exit"]), None)
                    if child is not None:
                        child.exited(int(doc["code"]))
                    else:  # the reply with its pid is not handled yet
                        self._replies[-int(doc["exit"])] = doc
                else:
                    self._replies[int(doc["id"])] = doc
                self._replied.notify_all()
        sock.close()
        proc.wait()
        with self._replied:
            orphans = dict(self._children)
        if orphans:
            log.warning("zygote exited", extra={"code": proc.returncode, "services": len(orphans)})
        while orphans:
            for pid, child in list(orphans.items()):
                code = _orphan_gone(pid)
                if code is not None:
                    with self._replied:
                        self._children.pop(pid, None)
                    child.exited(code)
                    del orphans[pid]
            time.sleep(0.2)

    def stop(self) -> None:
        """End the zygote (its children are the supervisor's to stop first). A ready one's socket
        is closed by its listener once the zygote is gone."""
        with self._lock:
            if self._sock is not None and not self._ready:
                self._sock.close()
            self._sock = None
            if self._proc is not None:
                end_process(self._proc, 5)


if __name__ == "__main__":
    main(sys.argv[1:])
