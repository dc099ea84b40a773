"""Dynamic micro-batching, as Triton's dynamic batcher does it: requests for one model wait until
``max_batch`` of them are there, or until the first has waited ``max_wait_ns``; then they are
scored with one session call. Pure logic (no threads, no clock of its own), so it is tested alone.

Why the service scores on its network thread instead of handing batches to a worker thread: the
shipped models take tens of microseconds a batch, and in CPython a worker must win the GIL back
from the network thread after every session call, then hand its scores back to be published. On
2 cores that made the saturated service three times slower (docs/inference.md has the figures).
Inline, while a batch is scored nothing else is read, which is the backpressure: the broker holds
what follows (within its in-flight limit), and pending requests never exceed ``max_batch`` per model.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class MicroBatcher(Generic[K, T]):
    __slots__ = ("_pending", "_since", "max_batch", "max_wait_ns")

    def __init__(self, max_batch: int, max_wait_ns: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.max_batch = max_batch
        self.max_wait_ns = max_wait_ns
        self._pending: dict[K, list[T]] = {}
        self._since: dict[K, int] = {}

    def add(self, key: K, item: T, now_ns: int) -> list[T] | None:
        """Queue ``item`` for ``key``; the batch when it is full (the caller scores it now)."""
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = []
            self._since[key] = now_ns
        batch.append(item)
        if len(batch) >= self.max_batch:
            return self.take(key)
        return None

    def take(self, key: K) -> list[T]:
        """Everything waiting for ``key`` (empty if nothing)."""
        self._since.pop(key, None)
        return self._pending.pop(key, [])

    def due(self, now_ns: int) -> list[tuple[K, list[T]]]:
        """The batches whose first request has waited ``max_wait_ns`` or more."""
        keys = [k for k, t in self._since.items() if now_ns - t >= self.max_wait_ns]
        return [(k, self.take(k)) for k in keys]

    def next_due_ns(self) -> int | None:
        """When the oldest waiting batch falls due (None: nothing waits): the caller sleeps until
        then instead of polling :meth:`due`."""
        if not self._since:
            return None
        return min(self._since.values()) + self.max_wait_ns

    def drain(self) -> list[tuple[K, list[T]]]:
        """Every waiting batch, whatever its age (on stop, or before a model is closed)."""
        return [(k, self.take(k)) for k in list(self._pending)]

    def __len__(self) -> int:
        return sum(len(b) for b in self._pending.values())
