"""Link faults made for real, for the uplink's fault tests (tests/integration/test_link_faults.py).

A :class:`Rig` is an edge Mosquitto and a "cloud" Mosquitto, each its own process, bridged with the
very lines ``outpost up`` writes (:func:`outpost.broker.uplink_bridge`), a sender process on the
edge broker and a receiver process on the cloud broker. The link between the brokers is one of:

* :class:`Loopback`: the cloud broker on 127.0.0.1 (broker restarts and kills need nothing more);
* :class:`Veth`: the cloud broker and the receiver in a network namespace of their own, reached
  over a veth pair (10.213.K.1/30 here, 10.213.K.2/30 there, K claimed per rig), so the test can
  cut the link (:meth:`Veth.cut`: the host's end goes down) and drop packets at random with
  iptables' statistic match in the namespace's own tables (:meth:`Veth.lossy`; this kernel has no
  netem). Needs root: :func:`veth_refused` says why not where namespaces are refused.

A :class:`DelayProxy` between the edge's bridge and the cloud broker adds latency.

What runs at the ends is pluggable (:class:`Ends`): how to start the sender and the receiver
(argv and environment, :class:`End`) and, once they run, a :class:`Probe` that puts records into
the sender and reads what the receiver holds (:class:`Held`) and what the sender still holds. The
tests run the uplink service and its cloud side (:mod:`tests.linkfaults_ends`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from outpost.broker import Mosquitto, free_port, uplink_bridge
from outpost.settings import BrokerSettings, UplinkSettings
from outpost.topics import Topics
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]
NETNS_PREFIX = "outpost-faults-"
"""Namespaces made here are named ``outpost-faults-{K}-{pid}`` (the pid of the test process)."""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


# --- the link ------------------------------------------------------------------------------------------
class Link(Protocol):
    cloud_host: str
    """Where the cloud broker listens (and the receiver reaches it)."""

    def prefix(self) -> list[str]:
        """What the cloud's processes (its broker, the receiver) are started under."""
        ...

    def close(self) -> None: ...


class Loopback:
    """The cloud on 127.0.0.1: no cut, no packet loss."""

    cloud_host = "127.0.0.1"

    def prefix(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def veth_refused() -> str | None:
    """Why a :class:`Veth` cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode:
        return f"network namespaces are refused here: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


def remove_leftovers() -> list[str]:
    """Namespaces of test processes that are gone (killed before their teardown): deleted, with the
    veth pairs in them. Returns their names."""
    gone = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(NETNS_PREFIX):
            continue
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name)
            gone.append(name)
    return gone


class Veth:
    """The cloud in a network namespace of its own, behind a veth pair the test can damage."""

    def __init__(self) -> None:
        remove_leftovers()
        used = _ip("-o", "-4", "addr").stdout
        for k in random.sample(range(1, 255), 254):
            if f" 10.213.{k}." in used:
                continue
            # the host-side name is the claim: two rigs (two test processes) never get the same K
            if _ip("link", "add", f"opf{k}", "type", "veth", "peer", "name", f"opf{k}c").returncode == 0:
                self.k = k
                break
        else:
            raise RuntimeError("no free veth name opfK / subnet 10.213.K.0/30 left")
        self.netns = f"{NETNS_PREFIX}{self.k}-{os.getpid()}"
        self.host_dev, self.cloud_dev = f"opf{self.k}", f"opf{self.k}c"
        self.host_ip, self.cloud_host = f"10.213.{self.k}.1", f"10.213.{self.k}.2"
        self._chain: str | None = None
        try:
            _run(["ip", "netns", "add", self.netns])
            _run(["ip", "link", "set", self.cloud_dev, "netns", self.netns])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev])
            _run(["ip", "link", "set", self.host_dev, "up"])
            inside = ["ip", "netns", "exec", self.netns]
            _run([*inside, "ip", "addr", "add", f"{self.cloud_host}/30", "dev", self.cloud_dev])
            _run([*inside, "ip", "link", "set", self.cloud_dev, "up"])
            _run([*inside, "ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def cut(self) -> None:
        """Take the host's end of the link down: nothing crosses until :meth:`mend`."""
        _run(["ip", "link", "set", self.host_dev, "down"])

    def mend(self) -> None:
        _run(["ip", "link", "set", self.host_dev, "up"])

    def lossy(self, probability: float) -> None:
        """Drop that share of the packets crossing the link, both ways, at random (a chain of its
        own in the namespace's tables, removed by :meth:`clear_loss` or with the namespace)."""
        chain = "OUTPOST_LOSS"
        ipt = [*self.prefix(), "iptables"]
        _run([*ipt, "-N", chain])
        drop = ["-m", "statistic", "--mode", "random", "--probability", str(probability), "-j", "DROP"]
        _run([*ipt, "-A", chain, *drop])
        _run([*ipt, "-A", "INPUT", "-i", self.cloud_dev, "-j", chain])
        _run([*ipt, "-A", "OUTPUT", "-o", self.cloud_dev, "-j", chain])
        self._chain = chain

    def dropped(self) -> int:
        """Packets the loss rule has dropped so far."""
        if self._chain is None:
            return 0
        out = _run([*self.prefix(), "iptables", "-L", self._chain, "-n", "-v", "-x"]).splitlines()
        return int(out[2].split()[0]) if len(out) > 2 else 0

    def clear_loss(self) -> None:
        if self._chain is None:
            return
        ipt = [*self.prefix(), "iptables"]
        for args in (
            ["-D", "INPUT", "-i", self.cloud_dev, "-j", self._chain],
            ["-D", "OUTPUT", "-o", self.cloud_dev, "-j", self._chain],
            ["-F", self._chain],
            ["-X", self._chain],
        ):
            subprocess.run([*ipt, *args], capture_output=True, check=False)
        self._chain = None

    def close(self) -> None:
        """The namespace goes, and with it the veth pair (both ends) and its iptables rules."""
        self.clear_loss()
        _ip("netns", "del", self.netns)
        _ip("link", "del", self.host_dev)  # only left when the namespace never got its end


def iptables_missing() -> str | None:
    return (
        None if shutil.which("iptables") else "iptables is not installed (the Makefile's APT_PACKAGES has it)"
    )


# --- latency -----------------------------------------------------------------------------------------
class DelayProxy:
    """A TCP proxy that holds every chunk ``delay_s`` before passing it on, both ways."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream = upstream
        self.delay_s = delay_s
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks += [client, up]
            for src, dst in ((client, up), (up, client)):
                self._pipe(src, dst)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        held: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def read() -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    held.put((time.monotonic() + self.delay_s, data))
            held.put((0.0, b""))

        def write() -> None:
            try:
                while True:
                    due, data = held.get()
                    if not data:
                        break
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)  # the delay itself
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):  # one side gone: the connection is over, as a router would see it
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self.server.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# --- the ends ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class End:
    """How one end runs: its command and its environment (over this one, ``OUTPOST_*`` removed)."""

    argv: list[str]
    env: dict[str, str]


@dataclass
class Held:
    """What the receiver holds: per device the seqs in the order it applied them, and how many
    copies of records it recognised as duplicates (and skipped)."""

    by_device: dict[str, list[int]]
    duplicates: int
    notes: str = ""
    """What else the ends have to say about the run (printed with the figures)."""

    @property
    def records(self) -> int:
        return sum(len(s) for s in self.by_device.values())


class Probe(Protocol):
    """The test's hands on the ends of one rig, made once both run."""

    def put(self, records: list[tuple[str, int]]) -> None:
        """(device, seq) records; returns once they are durably the sender's."""
        ...

    def held(self) -> Held: ...

    def backlog(self) -> int:
        """Records the sender still holds (not acknowledged by the receiver)."""
        ...

    def settle(self) -> None:
        """Once everything arrived: until the figures the ends report (``Held.duplicates``) count
        all of it."""
        ...

    def close(self) -> None: ...


class Ends(Protocol):
    """What runs at the two ends of the link."""

    def sender(self, rig: Rig) -> End: ...

    def receiver(self, rig: Rig) -> End: ...

    def probe(self, rig: Rig) -> Probe: ...


class EndProcess:
    """One end as a real process (under the link's prefix for the cloud's), its output in a log."""

    def __init__(self, name: str, end: End, prefix: list[str], workdir: Path) -> None:
        self.name, self.end, self.prefix, self.workdir = name, end, prefix, workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.runs += 1
        if self._log is not None:
            self._log.close()
        self._log = (self.workdir / f"{self.name}-{self.runs}.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("OUTPOST_")} | self.end.env
        self.proc = subprocess.Popen(
            [*self.prefix, *self.end.argv], env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """kill -9, as a power cut or the OOM killer would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
            for p in sorted(self.workdir.glob(f"{self.name}-*.log"))
        )


# --- the rig -----------------------------------------------------------------------------------------
@dataclass
class Rig:
    """Two brokers bridged over ``link``, the two ends, and a stream to push through."""

    workdir: Path
    site: str
    ends: Ends
    link: Link
    delay_s: float = 0.0
    devices: int = 8
    proxy: DelayProxy | None = None
    edge: Mosquitto = field(init=False)
    cloud: Mosquitto = field(init=False)
    sender: EndProcess = field(init=False)
    receiver: EndProcess = field(init=False)
    probe: Probe = field(init=False)
    fed: int = 0
    """Records the sender has taken so far."""
    feed_error: BaseException | None = None
    """What stopped the producer, if anything did."""

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(site=self.site)
        prefix = self.link.prefix()
        cloud_settings = BrokerSettings(port=free_port())
        if prefix:  # the broker runs in the namespace: its binary is a wrapper that enters it
            wrapper = self.workdir / "mosquitto-in-link"
            wrapper.write_text(f'#!/bin/sh\nexec {" ".join(prefix)} mosquitto "$@"\n')
            wrapper.chmod(0o755)
            cloud_settings.binary = str(wrapper)
        self.cloud = Mosquitto(
            self.workdir / "cloud-broker", settings=cloud_settings, host=self.link.cloud_host
        )
        self.cloud_at = f"{self.link.cloud_host}:{self.cloud.port}"
        """Where the edge's bridge reaches the cloud broker (through the proxy, if any)."""
        if self.delay_s:
            self.proxy = DelayProxy((self.link.cloud_host, self.cloud.port), self.delay_s)
            self.cloud_at = f"127.0.0.1:{self.proxy.port}"
        bridge = uplink_bridge(self.topics, UplinkSettings(cloud=self.cloud_at))
        self.edge = Mosquitto(self.workdir / "edge-broker", extra_conf=bridge)
        self.sender = EndProcess("sender", self.ends.sender(self), [], self.workdir)
        self.receiver = EndProcess("receiver", self.ends.receiver(self), prefix, self.workdir)

    def data_dir(self, site: str | None = None) -> Path:
        """The data folder of this rig's processes of ``site`` (the rig's own by default)."""
        return self.workdir / f"data-{site or self.site}"

    def env(self, host: str, port: int, *, site: str | None = None) -> dict[str, str]:
        """The ``OUTPOST_*`` settings of a process of this rig on the broker at ``host:port``."""
        return {
            "OUTPOST_SITE": site or self.site,
            "OUTPOST_DATA_DIR": str(self.data_dir(site)),
            "OUTPOST_MQTT__HOST": host,
            "OUTPOST_MQTT__PORT": str(port),
            "OUTPOST_TELEMETRY__METRICS_INTERVAL_S": "1",
        }

    def start(self) -> Rig:
        self.cloud.start()
        self.receiver.start()
        self.edge.start()
        self.sender.start()
        self.probe = self.ends.probe(self)
        return self

    def plan(self, total: int) -> list[tuple[str, int]]:
        """``total`` (device, seq) records of ``devices`` devices, interleaved, each device's seq
        from 1."""
        return [(f"dev{n % self.devices}", n // self.devices + 1) for n in range(total)]

    def produce(self, total: int, *, per_s: float = 2500.0, chunk: int = 100) -> threading.Thread:
        """Feed ``total`` records at about ``per_s`` a second, on a thread (join it)."""
        plan = self.plan(total)

        def run() -> None:
            t0 = time.monotonic()
            try:
                for i in range(0, total, chunk):
                    if (ahead := t0 + i / per_s - time.monotonic()) > 0:
                        time.sleep(ahead)  # the producer's pace, not a wait for a condition
                    self.probe.put(plan[i : i + chunk])
                    self.fed = i + len(plan[i : i + chunk])
            except BaseException as exc:  # for wait_settled to say, at once
                self.feed_error = exc
                raise

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def held(self) -> Held:
        return self.probe.held()

    def wait_held(self, n: int, timeout: float = 60.0) -> None:
        assert wait_until(lambda: self.held().records >= n, timeout), self.explain(f"never held {n}")

    def wait_settled(self, total: int, timeout: float = 120.0) -> Held:
        """Until the feed is done, the receiver holds ``total`` records and the sender holds
        nothing unacknowledged; what the receiver then holds."""
        ok = wait_until(
            lambda: (
                self.feed_error is not None
                or (self.fed >= total and self.held().records >= total and self.probe.backlog() == 0)
            ),
            timeout,
        )
        assert self.feed_error is None, self.explain(f"the producer stopped: {self.feed_error}")
        assert ok, self.explain(f"not settled: fed {self.fed}, held {self.held().records} of {total}")
        self.probe.settle()
        return self.held()

    def bridge_connected(self, want: bool, timeout: float = 60.0) -> None:
        """Wait until the edge broker's bridge holds a TCP connection to the cloud broker (``want``)
        or has dropped it (its keepalive found the link dead). Read from the kernel's sockets, not
        from the bridge's notifications: Mosquitto 2.0.11 publishes no ``0`` when its keepalive
        finds the link dead (the state still reads ``1``), only a ``1`` again once it is back.
        Only the edge broker's own sockets count (the test's clients of the cloud broker, which
        find the link dead later, are not the bridge)."""
        assert self.edge.proc is not None
        owner = f"pid={self.edge.proc.pid},"
        query = ["ss", "-Htnp", "state", "established", f"( dst {self.link.cloud_host} )"]
        ok = wait_until(lambda: (owner in _run(query)) == want, timeout)
        assert ok, self.explain(f"the bridge never {'connected' if want else 'dropped its connection'}")

    def explain(self, what: str) -> str:
        return f"{what}\n{self.sender.logs()}\n{self.receiver.logs()}"

    def close(self) -> None:
        for p in (self.sender, self.receiver):
            p.close()
        with contextlib.suppress(AttributeError):  # none when the rig failed to start
            self.probe.close()
        self.edge.stop()
        self.cloud.stop()
        if self.proxy is not None:
            self.proxy.close()
        self.link.close()


def check(held: Held, rig: Rig, total: int) -> None:
    """Zero loss, nothing twice, each device's order kept: every device holds exactly 1..n, in order."""
    want: dict[str, list[int]] = {}
    for device, seq in rig.plan(total):
        want.setdefault(device, []).append(seq)
    problems = []
    for device, seqs in sorted(want.items()):
        got = held.by_device.get(device, [])
        if got != seqs:
            missing = sorted(set(seqs) - set(got))
            doubled = len(got) - len(set(got))
            disorder = sum(1 for a, b in itertools.pairwise(got) if b <= a)
            problems.append(f"{device}: {len(missing)} missing, {doubled} twice, {disorder} out of order")
    assert not problems, "; ".join(problems)
    assert held.records == total


@contextlib.contextmanager
def rig(workdir: Path, site: str, ends: Ends, link: Link, *, delay_s: float = 0.0) -> Iterator[Rig]:
    """A started :class:`Rig`, closed (processes, brokers, proxy, link) whatever happens."""
    r: Rig | None = None
    try:
        r = Rig(workdir, site, ends, link, delay_s=delay_s)
        yield r.start()
    finally:
        if r is not None:
            r.close()
        else:
            link.close()
