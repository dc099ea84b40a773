"""``outpost.sim.run``: split the fleet over publisher processes, start them together, add up.

Several processes because one Python process tops out near 40k MQTT messages/s (docs/design.md): the
fleet is dealt round-robin over ``processes`` workers, each gets its share of the rate and of the
item quota, connects its devices, says it is ready, and all start on one signal so the measured
time covers sending only. Workers are *spawned*, not forked: the caller may be a test process with
live MQTT threads, and forking those (with their locks held) is how deadlocks are made.

With one process the publisher runs in the caller's process: no start-up cost, easy to debug.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
import time
from typing import Any

from outpost.errors import BrokerError, OutpostError
from outpost.sim.options import SimOptions
from outpost.sim.publisher import Flag, Publisher
from outpost.sim.report import SimReport, WorkerReport, merge
from outpost.sim.scenario import DeviceSpec, fleet_specs

READY_TIMEOUT_S = 60.0
"""How long workers may take to start and connect their devices."""


def plan(options: SimOptions) -> list[tuple[list[DeviceSpec], float, int | None]]:
    """Each worker's (devices, rate share, item quota share): devices dealt round-robin, rate and
    quota split in proportion to devices (the quota's remainder goes to the first workers)."""
    specs = fleet_specs(options.devices, options.scenario)
    count = min(options.processes, len(specs))
    shares = [specs[i::count] for i in range(count)]
    total = len(specs)
    quotas: list[int | None] = [None] * count
    if options.readings:
        base = [options.readings * len(s) // total for s in shares]
        for i in range(options.readings - sum(base)):
            base[i % count] += 1
        quotas = list(base)
    return [(s, options.rate * len(s) / total, q) for s, q in zip(shares, quotas, strict=True)]


def run(options: SimOptions, *, stop: threading.Event | None = None) -> SimReport:
    """Run the simulator against the broker in ``options`` and report what was sent.

    ``stop`` ends the run early (as Ctrl-C does); the report then covers what was sent so far.
    With ``processes`` > 1 the workers are spawned, so a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard (spawn re-imports the caller's main module)."""
    work = plan(options)
    if len(work) == 1:
        specs, rate, quota = work[0]
        pub = Publisher(options, specs, index=0, rate=rate, quota=quota)
        pub.connect_all()
        try:
            part = pub.run(stop)
        finally:
            pub.close()
        return _merge(options, [part])
    return _run_processes(options, work, stop)


def _merge(options: SimOptions, parts: list[WorkerReport]) -> SimReport:
    """One report; its elapsed time is the slowest process's sending time (start signal to the
    last byte flushed and, at QoS 1, acknowledged), not process start-up or the final goodbyes."""
    parts.sort(key=lambda p: p.index)
    return merge(
        parts,
        elapsed_s=max(p.elapsed_s for p in parts),
        scenario=options.scenario,
        seed=options.seed,
        batch=options.batch,
        qos=options.qos,
        site=options.site,
        broker=options.broker,
    )


def _run_processes(
    options: SimOptions, work: list[tuple[list[DeviceSpec], float, int | None]], stop: threading.Event | None
) -> SimReport:
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    results: Any = ctx.Queue()
    start = ctx.Event()
    halt = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker,
            args=(options, i, specs, rate, quota, ready, results, start, halt),
            name=f"outpost-sim-{i}",
            daemon=True,
        )
        for i, (specs, rate, quota) in enumerate(work)
    ]
    for p in procs:
        p.start()
    try:
        _await_ready(procs, ready)
        start.set()
        parts = _collect(options, procs, results, halt, stop)
    except BaseException:
        halt.set()
        start.set()
        raise
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return _merge(options, parts)


def _await_ready(procs: list[Any], ready: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = len(procs)
    while waiting:
        try:
            index, error = ready.get(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise BrokerError(f"simulator workers not ready within {READY_TIMEOUT_S}s") from None
            _check_alive(procs)
            continue
        if error is not None:
            raise BrokerError(f"simulator worker {index}: {error}")
        waiting -= 1


def _collect(
    options: SimOptions, procs: list[Any], results: Any, halt: Any, stop: threading.Event | None
) -> list[WorkerReport]:
    parts: list[WorkerReport] = []
    # Workers stop by themselves after the duration; the margin covers flushing and closing.
    deadline = time.monotonic() + options.duration + 60.0
    while len(parts) < len(procs):
        try:
            parts.append(results.get(timeout=0.2))
            continue
        except queue.Empty:
            pass
        except KeyboardInterrupt:
            halt.set()  # workers ignore SIGINT: they stop on this flag and still report
            continue
        if stop is not None and stop.is_set():
            halt.set()
        if time.monotonic() > deadline:
            halt.set()
            raise OutpostError("simulator workers did not finish in time")
        _check_alive(procs)
    return parts


def _check_alive(procs: list[Any]) -> None:
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise OutpostError(f"simulator worker {dead[0].name} died with exit code {dead[0].exitcode}")


def _worker(
    options: SimOptions,
    index: int,
    specs: list[DeviceSpec],
    rate: float,
    quota: int | None,
    ready: Any,
    results: Any,
    start: Any,
    halt: Flag,
) -> None:
    """Body of one spawned publisher process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into ``halt``
    try:
        pub = Publisher(options, specs, index=index, rate=rate, quota=quota)
        pub.connect_all()
    except Exception as exc:  # noqa: BLE001 - any start failure goes to the parent as text
        ready.put((index, f"{type(exc).__name__}: {exc}"))
        return
    ready.put((index, None))
    try:
        if not start.wait(READY_TIMEOUT_S * 2) or halt.is_set():
            return
        results.put(pub.run(halt))
    finally:
        pub.close()
