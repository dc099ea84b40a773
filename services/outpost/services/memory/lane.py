"""Memory's request lane: requests wait here for the worker, fairly and boundedly.

One client's burst of heavy requests must slow that client alone: requests wait in one queue per
client (the response topic names the client), are taken round-robin across clients, and past
``per_client`` waiting for one client or ``total`` for all a request is refused at once (shed,
counted and dead-lettered by the service as ``overloaded``) instead of queueing without end.

Pure logic, single-threaded (the bus's network thread).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

J = TypeVar("J")


class FairLane(Generic[J]):
    def __init__(self, *, total: int, per_client: int) -> None:
        if total < 1 or per_client < 1:
            raise ValueError("a lane holds at least one request")
        self.total = total
        self.per_client = per_client
        self._queues: OrderedDict[str, deque[J]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def offer(self, client: str, job: J) -> str | None:
        """Queue ``job`` for ``client``; None when queued, else why it is shed."""
        q = self._queues.get(client)
        if q is not None and len(q) >= self.per_client:
            return f"{len(q)} requests of this client are waiting (memory.request_queue_per_client)"
        if self._len >= self.total:
            return f"{self._len} requests are waiting (memory.request_queue)"
        if q is None:
            q = self._queues[client] = deque()
        q.append(job)
        self._len += 1
        return None

    def take(self) -> J | None:
        """The next job: the first waiting client's oldest, that client then going last."""
        if not self._queues:
            return None
        client, q = next(iter(self._queues.items()))
        job = q.popleft()
        self._len -= 1
        if q:
            self._queues.move_to_end(client)
        else:
            del self._queues[client]
        return job

    def clear(self) -> list[J]:
        """Everything waiting, in the order it would have run (the lane is then empty)."""
        out: list[J] = []
        while (job := self.take()) is not None:
            out.append(job)
        return out
