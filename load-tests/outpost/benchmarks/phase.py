"""One measured phase: a load generator, a sink and (optionally) ingest, each in its own process,
through one Mosquitto; the rate is what reaches the sink inside a window after a warm-up.

The parent only sleeps and samples: shared counters at the window's edges give the rates, and
``psutil`` CPU times of every process (and of the whole machine) show who used the two cores, so a
figure taken while other work was running says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import psutil

from outpost.benchmarks.channels import Channels, spawn_context
from outpost.benchmarks.load import LoadSpec, run_publisher
from outpost.benchmarks.sinks import SinkSpec, run_event_sink, run_raw_sink
from outpost.broker import Mosquitto
from outpost.errors import OutpostError
from outpost.process import end_process
from outpost.stack import Stack


class BenchError(OutpostError):
    """A benchmark could not run (a process failed to start, connect or report)."""


Target = Literal["raw", "ingest"]


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    target: Target
    qos: int = 0
    batch: int = 1
    devices: int = 100
    rate: float = 0.0  # readings/s offered; 0: windowed, as fast as the sink takes it
    window: int = 5000  # readings in flight in windowed mode
    warmup_s: float = 1.0
    measure_s: float = 5.0
    latency: bool = False
    mqtt5: bool = False  # raw phases: the sink speaks MQTT 5 like the bus (paho's default is 3.1.1)
    drain_s: float = 3.0  # after the load stops, the longest wait for the sink to catch up
    ingest_env: tuple[tuple[str, str], ...] = ()  # extra OUTPOST_* settings for ingest
    profile_dir: Path | None = None  # py-spy ingest during the window, write collapsed stacks here
    site: str = ""

    @property
    def site_id(self) -> str:
        return self.site or ("b-" + self.name.replace("_", "-"))[:64]


def busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def steal_s() -> float:
    """CPU seconds the hypervisor gave to other guests while this VM wanted to run."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


def cpu_s(proc: psutil.Process | None) -> float:
    """CPU seconds a process has used (0 once it is gone)."""
    if proc is None:
        return 0.0
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


@dataclass
class Sample:
    t: float
    sent: int
    received: int
    cpu: dict[str, float]
    busy: float
    steal: float


class Procs:
    """A benchmark's processes by role, for CPU sampling."""

    def __init__(self) -> None:
        self.ps: dict[str, psutil.Process] = {}

    def add(self, role: str, pid: int | None) -> None:
        if pid is not None:
            self.ps[role] = psutil.Process(pid)

    def sample(self, ch: Channels) -> Sample:
        return Sample(
            t=time.perf_counter(),
            sent=ch.sent.value,
            received=ch.received.value,
            cpu={role: cpu_s(p) for role, p in self.ps.items()},
            busy=busy_s(),
            steal=steal_s(),
        )


def drain(ch: Channels, sent: int, max_s: float, stall_s: float = 1.0) -> int:
    """Wait until the sink has everything that was sent, or ``max_s`` passes, or nothing arrived for
    ``stall_s``; return what it has. A slow pair still draining is waited for, a loss is not."""
    deadline = time.monotonic() + max_s
    last, last_change = ch.received.value, time.monotonic()
    while last < sent:
        time.sleep(0.01)
        now, got = time.monotonic(), ch.received.value
        if got != last:
            last, last_change = got, now
        elif now - last_change > stall_s or now > deadline:
            break
    return last


def cpu_between(a: Sample, b: Sample) -> dict[str, float]:
    """% of one core per role between two samples; ``other`` is everything else that ran (other
    people's tests, say), ``steal`` the time the hypervisor ran other guests instead of this one."""
    dt = b.t - a.t
    cpu = {role: round(100.0 * (b.cpu[role] - a.cpu.get(role, 0.0)) / dt, 1) for role in b.cpu}
    busy = 100.0 * (b.busy - a.busy) / dt
    cpu["other"] = round(max(0.0, busy - sum(cpu.values())), 1)
    cpu["steal"] = round(100.0 * (b.steal - a.steal) / dt, 1)
    return cpu


def start_ingest(
    port: int, site: str, qos: int, workdir: Path, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``python -m outpost.services.ingest`` with its settings in OUTPOST_* variables, run in
    ``workdir`` so that no ``outpost.yaml`` of the caller's is picked up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    env.update(
        OUTPOST_SITE=site,
        OUTPOST_DATA_DIR=str(workdir / "data"),
        OUTPOST_MQTT__HOST="127.0.0.1",
        OUTPOST_MQTT__PORT=str(port),
        OUTPOST_INGEST__QOS=str(qos),
        OUTPOST_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "ingest.log", "wb") as logf:
        return subprocess.Popen(
            [sys.executable, "-m", "outpost.services.ingest"],
            env=env,
            cwd=workdir,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 15.0) -> int | None:
    """SIGTERM (ingest drains and exits), then SIGKILL if it has not exited in time."""
    if proc is None:
        return None
    end_process(proc, timeout_s)
    return proc.returncode


def wait_ready(what: str, ok: Callable[[], bool], timeout_s: float, alive: Callable[[], str | None]) -> None:
    """Until ``ok()``; a BenchError when ``alive()`` names a process that died, or past the timeout."""
    deadline = time.monotonic() + timeout_s
    while not ok():
        dead = alive()
        if dead:
            raise BenchError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout_s}s")
        time.sleep(0.01)


def drain_until(
    received: Callable[[], Any],
    done: Callable[[Any], bool],
    drain_s: float,
    stall_s: float,
    *,
    tick_s: float = 0.02,
    on_tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Wait until ``done(received())``, or ``drain_s`` passed, or ``received()`` has not changed for
    ``stall_s``: a slow site is waited for, one that lost messages or stopped is not waited for
    forever. Returns how long it waited and why it ended."""
    t0 = last_change = time.monotonic()
    last = received()
    while True:
        now, got = time.monotonic(), received()
        if done(got):
            reason = "complete"
            break
        if got != last:
            last, last_change = got, now
        elif now - last_change > stall_s:
            reason = f"nothing new for {stall_s:g} s"
            break
        if now - t0 > drain_s:
            reason = f"deadline ({drain_s:g} s)"
            break
        if on_tick is not None:
            on_tick()
        time.sleep(tick_s)
    return {"s": round(time.monotonic() - t0, 2), "ended": reason}


def take_result(ch: Channels, role: str) -> dict[str, Any]:
    """The figures a load or sink process reported; a BenchError when it did not, or failed."""
    r = ch.take_results(1, 20).get(role)
    if r is None:
        raise BenchError(f"the {role} process did not report")
    if "error" in r:
        raise BenchError(f"the {role} process failed:\n{r['error']}")
    return r


def stack_pids(stack: Stack) -> dict[str, int | None]:
    """Each service's pid and the broker's, as the stack runs them now."""
    out: dict[str, int | None] = {}
    if stack.supervisor is not None:
        for row in stack.supervisor.status():
            pid = row["pid"]
            out[str(row["service"])] = pid if isinstance(pid, int) else None
    if stack.broker is not None and stack.broker.proc is not None:
        out["mosquitto"] = stack.broker.proc.pid
    return out


@contextmanager
def _profiler(spec: PhaseSpec, pid: int | None) -> Iterator[None]:
    """py-spy attached to ingest for the measurement window (all threads: the work is on the bus's)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if spec.profile_dir is None or pid is None or not Path(exe).exists():
        yield
        return
    spec.profile_dir.mkdir(parents=True, exist_ok=True)
    out = spec.profile_dir / f"{spec.name}.txt"
    cmd = [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out)]
    cmd += ["--duration", str(max(1, round(spec.measure_s)))]
    prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            prof.wait(max(5.0, spec.measure_s + 5))
        except subprocess.TimeoutExpired:
            prof.kill()
            prof.wait()


def run_phase(broker: Mosquitto, spec: PhaseSpec, workdir: Path) -> dict[str, Any]:
    """Run one phase and return its figures (rates in readings/s, CPU in % of one core)."""
    ctx = spawn_context()
    ch = Channels.create(ctx)
    site = spec.site_id
    load = LoadSpec(
        host=broker.host,
        port=broker.port,
        site=site,
        qos=spec.qos,
        batch=spec.batch,
        devices=spec.devices,
        rate=spec.rate,
        window=spec.window,
        client_id=f"bench-load-{site}",
    )
    sink = SinkSpec(
        host=broker.host,
        port=broker.port,
        site=site,
        qos=spec.qos,
        batch=spec.batch,
        latency=spec.latency,
        mqtt5=spec.mqtt5,
        client_id=f"bench-sink-{site}",
    )
    sink_fn = run_raw_sink if spec.target == "raw" else run_event_sink
    sink_p: BaseProcess = ctx.Process(target=sink_fn, args=(sink, ch), name="bench-sink", daemon=True)
    pub_p: BaseProcess = ctx.Process(target=run_publisher, args=(load, ch), name="bench-load", daemon=True)
    ingest: subprocess.Popen[bytes] | None = None
    procs = Procs()
    phase_dir = workdir / spec.name

    def dead() -> str | None:
        for p in (sink_p, pub_p):
            if p.exitcode is not None:
                got = ch.take_results(1, 0.5)
                errs = [r.get("error", "") for r in got.values()]
                return f"{p.name} exited with {p.exitcode}: {' '.join(errs)[-2000:]}"
        if ingest is not None and ingest.poll() is not None:
            log = (phase_dir / "ingest.log").read_text(errors="replace")[-2000:]
            return f"ingest exited with {ingest.returncode}: {log}"
        return None

    try:
        sink_p.start()
        pub_p.start()
        procs.add("sink", sink_p.pid)
        procs.add("load", pub_p.pid)
        if broker.proc is not None:
            procs.add("mosquitto", broker.proc.pid)
        wait_ready("sink", ch.sink_ready.is_set, 30, dead)
        if spec.target == "ingest":
            ingest = start_ingest(broker.port, site, spec.qos, phase_dir, dict(spec.ingest_env))
            procs.add("ingest", ingest.pid)
            wait_ready("ingest", ch.service_ready.is_set, 30, dead)
        wait_ready("load generator", ch.pub_ready.is_set, 30, dead)

        ch.go.value = 1
        time.sleep(spec.warmup_s)
        ch.lat_from.value = time.time_ns()
        a = procs.sample(ch)
        with _profiler(spec, ingest.pid if ingest else None):
            time.sleep(spec.measure_s)
            b = procs.sample(ch)
            ch.lat_to.value = time.time_ns()
        ch.stop_pub.value = 1
        pub_p.join(30)
        sent = ch.sent.value
        received = drain(ch, sent, spec.drain_s)
        ingest_rc = stop_process(ingest)
        ch.stop_sink.value = 1
        results = ch.take_results(2, 20)
        sink_p.join(10)
    finally:
        for p in (pub_p, sink_p):
            if p.is_alive():
                p.terminate()
                p.join(5)
        stop_process(ingest, 5)

    for role in ("load", "sink"):
        if role not in results:
            raise BenchError(f"phase {spec.name}: the {role} process did not report")
        if "error" in results[role]:
            raise BenchError(f"phase {spec.name}: the {role} process failed:\n{results[role]['error']}")
    dt = b.t - a.t
    rate = (b.received - a.received) / dt
    cpu = cpu_between(a, b)
    sink_r = {k: v for k, v in results["sink"].items() if k != "spec"}
    load_r = {k: v for k, v in results["load"].items() if k != "spec"}
    out: dict[str, Any] = {
        "name": spec.name,
        "target": spec.target,
        "qos": spec.qos,
        "mqtt5": spec.mqtt5 or spec.target == "ingest",
        "batch": spec.batch,
        "devices": spec.devices,
        "window_s": round(dt, 3),
        "readings_per_s": round(rate, 1),
        "msgs_per_s": round(rate / spec.batch, 1),
        "offered_per_s": round((b.sent - a.sent) / dt, 1),
        "sent": sent,
        "received": received,
        # published but not received when the drain wait ended: still queued (a saturated phase) or lost
        "undelivered": max(0, sent - received),
        "payload_bytes_mean": round(float(load_r.get("payload_bytes_mean", 0.0)), 1),
        "cpu_pct": cpu,
        "sink": sink_r,
    }
    if spec.target == "ingest":
        out["ingest_exit"] = ingest_rc
    if spec.latency:
        out["latency"] = sink_r.pop("latency", {})
    if spec.rate:
        out["saturated"] = rate < 0.95 * spec.rate
    return out


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A benchmark's temporary folder, removed afterwards; traversable by others because Mosquitto,
    started as root, runs as the user mosquitto and must reach its folder inside."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o711)
        yield work
