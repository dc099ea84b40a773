"""Memory's request lane: requests wait here for the worker, fairly and boundedly.

One client's burst of heavy requests must slow that client alone. Requests are taken in the order
of start-time fair queuing: each client's requests are numbered on from where that client left off,
never from before the request now running, and the lowest number goes first (arrival breaks ties).
A client that sent nothing for a while goes next, ahead of a burst that was there before it; two
busy clients alternate. Past ``per_client`` waiting for one client or ``total`` for all, a request
is refused at once (shed: counted and dead-lettered by the service as ``overloaded``) instead of
queueing without end. The service runs at most one request of a client at a time (``busy``), so
with two workers one client's burst leaves the other free for everyone else. The client is what
the response topic names.

Pure logic, single-threaded (the bus's network thread).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection
from typing import Generic, TypeVar

J = TypeVar("J")


class FairLane(Generic[J]):
    def __init__(self, *, total: int, per_client: int) -> None:
        if total < 1 or per_client < 1:
            raise ValueError("a lane holds at least one request")
        self.total = total
        self.per_client = per_client
        self._heap: list[tuple[int, int, str, J]] = []
        self._seq = itertools.count()
        self._now = 0
        """The start number of the request taken last (the virtual time)."""
        self._next_of: dict[str, int] = {}
        """Each waiting client's next start number."""
        self._waiting: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def offer(self, client: str, job: J) -> str | None:
        """Queue ``job`` for ``client``; None when queued, else why it is shed."""
        waiting = self._waiting.get(client, 0)
        if waiting >= self.per_client:
            return f"{waiting} requests of this client are waiting (memory.request_queue_per_client)"
        if len(self._heap) >= self.total:
            return f"{len(self._heap)} requests are waiting (memory.request_queue)"
        start = max(self._now, self._next_of.get(client, 0))
        self._next_of[client] = start + 1
        self._waiting[client] = waiting + 1
        heapq.heappush(self._heap, (start, next(self._seq), client, job))
        return None

    def take(self, busy: Collection[str] = ()) -> tuple[str, J] | None:
        """The next job and its client (the lowest start number; the earliest among equals),
        passing over the ``busy`` clients (one of theirs runs already)."""
        skipped = []
        while self._heap and self._heap[0][2] in busy:
            skipped.append(heapq.heappop(self._heap))
        found = heapq.heappop(self._heap) if self._heap else None
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if found is None:
            return None
        start, _, client, job = found
        self._now = start
        left = self._waiting[client] - 1
        if left:
            self._waiting[client] = left
        else:
            del self._waiting[client]
        # a client with nothing waiting whose numbers are behind the clock is where a new one
        # would start: forgotten, so the table never outgrows the clients waiting
        for c in [c for c, n in self._next_of.items() if n <= self._now and c not in self._waiting]:
            del self._next_of[c]
        return client, job

    def clear(self) -> list[J]:
        """Everything waiting, in the order it would have run (the lane is then empty)."""
        out: list[J] = []
        while (taken := self.take()) is not None:
            out.append(taken[1])
        return out
