"""What a benchmark's processes share: counters and flags in shared memory, and a result queue.

Counters are ctypes integers in shared memory (``RawValue``) with one writer each; a read costs about
100 ns and takes no lock, so the load generator can check its in-flight window before every publish
and the sinks can count every message without a pipe or a lock on the hot path.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from multiprocessing.context import SpawnContext
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any, Protocol


class Cell(Protocol):
    """A shared integer (``multiprocessing.RawValue('q')``)."""

    value: int


def spawn_context() -> SpawnContext:
    """Spawn, not fork: the parent may hold threads (rich's live display, a Bus), and a forked child
    would inherit their locks in whatever state they were."""
    return mp.get_context("spawn")


@dataclass(frozen=True)
class Channels:
    sent: Cell  # readings published so far (the load generator writes it)
    received: Cell  # readings that came out at the far end, plus dead letters (the sink writes it)
    go: Cell  # 1: the load generator starts publishing
    stop_pub: Cell  # 1: the load generator stops
    stop_sink: Cell  # 1: the sink reports and exits
    lat_from: Cell  # the sink records latencies of readings stamped in [lat_from, lat_to), epoch ns
    lat_to: Cell  # 0: no upper bound yet
    pub_ready: Event  # the load generator is connected
    sink_ready: Event  # the sink has its subscriptions
    service_ready: Event  # the service under test said it is online (ingest phases)
    results: Queue[tuple[str, dict[str, Any]]]

    @classmethod
    def create(cls, ctx: SpawnContext) -> Channels:
        def cell() -> Cell:
            c: Cell = ctx.RawValue("q", 0)
            return c

        return cls(
            sent=cell(),
            received=cell(),
            go=cell(),
            stop_pub=cell(),
            stop_sink=cell(),
            lat_from=cell(),
            lat_to=cell(),
            pub_ready=ctx.Event(),
            sink_ready=ctx.Event(),
            service_ready=ctx.Event(),
            results=ctx.Queue(),
        )

    def take_results(self, n: int, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Collect ``n`` (role, result) pairs; roles that did not report are missing."""
        out: dict[str, dict[str, Any]] = {}
        for _ in range(n):
            try:
                role, result = self.results.get(timeout=timeout_s)
            except queue.Empty:
                break
            out[role] = result
        return out


@contextmanager
def reporting(ch: Channels, role: str, spec: object = None) -> Iterator[dict[str, Any]]:
    """A benchmark process's result dict (with its ``spec`` when one is given), put on the results
    channel under ``role`` however the body ends: a failure adds its traceback, since the parent
    reports it and a child's traceback alone on stderr is easy to miss.

    What the process has imported and made so far is frozen out of the garbage collector
    (:func:`gc.freeze`): a full collection over httpx's or paho's objects stalls the process for
    tens of milliseconds, and one landing in a window counts as the latency of whatever it
    measures there (seen as an 80 ms stall in the connectors bench's direct calls)."""
    gc.collect()
    gc.freeze()
    result: dict[str, Any] = (
        {"spec": asdict(spec)} if is_dataclass(spec) and not isinstance(spec, type) else {}
    )
    try:
        yield result
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        ch.results.put((role, result))
