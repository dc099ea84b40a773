"""Run services as supervised child processes: restart with backoff, count restarts, stop cleanly.

A service that crashes is restarted after 0.5 s, then 1 s, 2 s, ... up to 30 s; a run that lasted a
minute resets the backoff. Stopping sends SIGTERM (the services drain and checkpoint) and SIGKILL
only to a child that has not exited within the grace period.

Each child's output (stdout and stderr) comes through a pipe: the supervisor keeps its last lines in
memory and appends them to the service's log file when it can, so a service that cannot start says
why (:attr:`Child.reason`) even when its log file cannot be written. A child gets SIGTERM when the
supervisor's process dies, even by kill -9 (PR_SET_PDEATHSIG), so none is left running.

Each service is forked by a zygote that has imported what the services import (:mod:`outpost.zygote`:
most of a service's memory is then shared, and it starts without importing it again); to the
service it is what ``python -m MODULE`` would have been.

Which services is the caller's to say (name -> module run with ``python -m``), and what the zygote
imports first (``preload``): the core knows none; ``outpost up`` takes both from the service
registry (:mod:`outpost.services.registry`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from outpost.log import get_logger
from outpost.process import die_with_parent
from outpost.zygote import Forked, Zygote, ZygoteError

log = get_logger("outpost.supervisor")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
KEPT_LINES = 50
"""Lines of each child's output kept in memory (the reason it stopped is among the last)."""

_early: Zygote | None = None


def start_zygote_early(preload: list[str]) -> None:
    """For a command that is about to start the services (``outpost up``): the zygote starts
    importing them now, while the command imports the rest of itself (a second and a half each; on
    a gateway's cores the two overlap); :func:`zygote_for` hands it to the stack. ``preload`` may
    name them without importing anything here (``@module:attr``, :func:`outpost.zygote._preload`)."""
    global _early
    _early = Zygote(preload, dict(os.environ), preexec=die_with_parent(os.getpid())).start()


def zygote_for(preload: list[str], env: dict[str, str]) -> Zygote:
    """A zygote for a supervisor's services, started: it stops when this process dies. The one
    :func:`start_zygote_early` started, if any (once)."""
    global _early
    if _early is not None:
        early, _early = _early, None
        return early
    return Zygote(preload, {**os.environ, **env}, preexec=die_with_parent(os.getpid())).start()


@dataclass
class Child:
    name: str
    module: str
    proc: Forked | None = None
    started: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    next_start: float = 0.0
    backoff: float = BACKOFF_MIN_S
    log_path: Path | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=KEPT_LINES))
    """The child's last lines of output, newest last."""
    log_error: str | None = None
    """Why the log file cannot be written (None: it can); the output is still kept in ``lines``."""
    _reader: threading.Thread | None = None

    def retry_later(self, now: float) -> float:
        """Start it again after the current backoff, which doubles (to its cap) for the next time;
        the wait."""
        wait = self.backoff
        self.next_start = now + wait
        self.backoff = min(wait * 2, BACKOFF_MAX_S)
        return wait

    @property
    def reason(self) -> str:
        """What the last lines say about a child that exited non-zero ('' otherwise): the last
        ``error: ...`` line (what ``service_main`` writes to stderr, first, when a service cannot
        run; its log record may follow it), else its last line of output."""
        if self.last_exit in (None, 0):
            return ""
        said = next((line for line in reversed(self.lines) if line.startswith("error: ")), "")
        said = said or next((line for line in reversed(self.lines) if line.strip()), "")
        return said or f"exit {self.last_exit} without output"

    @property
    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running"
        return "restarting" if self.next_start else "stopped"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started if self.pid else 0.0


@dataclass
class Supervisor:
    env: dict[str, str]
    log_dir: Path
    services: dict[str, str]
    """name -> module run with ``python -m``, started in this order."""
    child_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """More variables for one service, by name, over ``env`` (its own broker credentials)."""
    preload: list[str] = field(default_factory=list)
    """Modules the zygote imports before it forks the services (theirs, for them to share)."""
    zygote: Zygote | None = None
    """What forks the services; None: one of the supervisor's own, importing ``preload``. A caller
    may start it earlier, so that it imports while the caller does other things."""
    children: dict[str, Child] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if self.zygote is None:
            self.zygote = zygote_for(self.preload, self.env)
        for name, module in self.services.items():
            child = self.children[name] = Child(name, module, log_path=self.log_dir / f"{name}.log")
            self._spawn(child)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, child: Child) -> None:
        if child._reader is not None:
            child._reader.join(1)  # the last run's output is all read before the next one's
        assert self.zygote is not None
        child.started = time.monotonic()
        child.next_start = 0.0
        try:
            child.proc = self.zygote.spawn(
                child.name, child.module, {**os.environ, **self.env, **self.child_env.get(child.name, {})}
            )
        except (OSError, ZygoteError) as exc:  # tried again with backoff, as for a service that died
            child.proc = None
            child.last_exit = 1
            child.lines.append(f"error: {exc}")
            child.retry_later(child.started)
            log.warning("service not started", extra={"service": child.name, "error": str(exc)})
            return
        child._reader = threading.Thread(
            target=self._read, args=(child, child.proc), name=f"output-{child.name}", daemon=True
        )
        child._reader.start()
        log.info("started", extra={"service": child.name, "pid": child.proc.pid})

    def _read(self, child: Child, proc: Forked) -> None:
        """Keep the child's lines and append them to its log file, best effort: a log that cannot
        be written (a full disk, a folder that is a file) loses the file's copy, never the output
        in memory, and never blocks the child on a full pipe."""
        assert proc.stdout is not None
        out: IO[bytes] | None = None
        if child.log_path is not None:
            try:
                child.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = child.log_path.open("ab")
                child.log_error = None
            except OSError as exc:
                child.log_error = f"log file {child.log_path} cannot be written: {exc.strerror or exc}"
                log.warning("no log file", extra={"service": child.name, "error": child.log_error})
        for raw in proc.stdout:
            child.lines.append(raw.decode("utf-8", "replace").rstrip())
            if out is not None:
                try:
                    out.write(raw)
                    out.flush()
                except OSError as exc:
                    child.log_error = f"log file {child.log_path} cannot be written: {exc.strerror or exc}"
                    out = None
        proc.stdout.close()
        if out is not None:
            out.close()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for child in self.children.values():
                if child.proc is not None and child.proc.poll() is not None and not child.next_start:
                    child.last_exit = child.proc.returncode
                    if now - child.started > STABLE_AFTER_S:
                        child.backoff = BACKOFF_MIN_S
                    wait = child.retry_later(now)
                    if child._reader is not None:
                        child._reader.join(1)  # its last lines say why it exited
                    log.warning(
                        "service exited; restarting",
                        extra={
                            "service": child.name,
                            "code": child.last_exit,
                            "in_s": wait,
                            "said": child.reason[:300],
                        },
                    )
                elif child.next_start and now >= child.next_start and not self._stop.is_set():
                    child.restarts += 1
                    self._spawn(child)

    def stop(self, grace_s: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children.values():
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service did not stop in time; killing", extra={"service": child.name})
                child.proc.kill()
                child.proc.wait()
            child.last_exit = child.proc.returncode
            child.next_start = 0.0
            if child._reader is not None:
                child._reader.join(2)
        if self.zygote is not None:
            self.zygote.stop()

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "service": c.name,
                "state": c.state,
                "pid": c.pid,
                "restarts": c.restarts,
                "uptime_s": round(c.uptime_s, 1),
                "last_exit": c.last_exit,
                "reason": c.reason,
                "log_error": c.log_error,
            }
            for c in self.children.values()
        ]
