"""Where a service's blocking work runs (an HTTP call, a database write, a model too slow for the
network thread): worker threads fed by a bounded queue.

Handlers run on the bus's network thread, which must keep reading, acknowledging and pinging the
broker. A handler hands blocking work to :meth:`Worker.submit` and gets the outcome back on the
network thread (through ``post``), so the service's state still needs no locks. The queue is
bounded: when it is full, :attr:`Worker.has_room` is False and the bus stops reading new messages
(its read gate) until the workers catch up; unacknowledged QoS 1 messages then wait on the broker,
which is the backpressure MQTT offers. Nothing is ever dropped: a submit beyond the bound (made by
the network thread while the gate closes) is queued all the same.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from outpost.log import get_logger

log = get_logger("outpost.worker")

R = TypeVar("R")


@dataclass(slots=True)
class _Job(Generic[R]):
    fn: Callable[[], R]
    done: Callable[[R | BaseException], None]


_STOP: Any = object()


class Worker:
    def __init__(
        self,
        name: str,
        post: Callable[[Callable[[], None]], None],
        *,
        threads: int = 1,
        bound: int = 64,
    ) -> None:
        """``post`` runs a callable on the network thread (``Bus.post``); ``bound`` is how many jobs
        may wait before the bus stops reading."""
        if threads < 1 or bound < 1:
            raise ValueError("a worker needs at least one thread and a bound of at least one")
        self.name = name
        self._post = post
        self._bound = bound
        self._q: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._queued = 0
        """Jobs submitted and not finished (network thread only)."""
        self._nthreads = threads
        self._threads: list[threading.Thread] = []
        self._started = False
        self._lock = threading.Lock()
        self.busy_ns = 0
        self.completed = 0

    @property
    def has_room(self) -> bool:
        return self._queued < self._bound

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, fn: Callable[[], R], done: Callable[[R | BaseException], None]) -> None:
        """Run ``fn`` on a worker thread; ``done(result or exception)`` then runs on the network
        thread. Call from the network thread."""
        if not self._started:
            self.start()
        self._queued += 1
        self._q.put(_Job(fn, done))

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._threads = [
                threading.Thread(target=self._run, name=f"{self.name}-worker-{i}", daemon=True)
                for i in range(self._nthreads)
            ]
            for t in self._threads:
                t.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the threads."""
        if not self._started:
            return
        for _ in self._threads:
            self._q.put(_STOP)
        for t in self._threads:
            t.join(timeout=timeout_s)
        self._started = False

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is _STOP:
                return
            start = time.perf_counter_ns()
            result: Any
            try:
                result = job.fn()
            except BaseException as exc:  # noqa: BLE001 - handed to done(), which decides
                result = exc
            with self._lock:
                self.busy_ns += time.perf_counter_ns() - start
            self._post(self._finisher(job, result))

    def _finisher(self, job: _Job[Any], result: Any) -> Callable[[], None]:
        def finish() -> None:
            self._queued -= 1
            self.completed += 1
            job.done(result)

        return finish
