"""When a received message may be acknowledged: one rule for every service.

A QoS 1 message is acknowledged (PUBACK) only once what it caused is safe: its dead letters and
outputs confirmed by the broker, its commit done, its blocking work finished. Until then it stays
unacknowledged on the broker, which redelivers it after a crash, so nothing is lost between
"received" and "safe".

Received messages are grouped in **turns**. A turn holds one message (a handler that is done with
its message when it returns) or every message received since the last commit (a service that
batches, like ingest's flush or memory's log commit). A turn is acknowledged when it is *sealed*
(its handler returned, or its commit ran) and nothing *holds* it: each output publish, dead letter
or piece of blocking work made for it holds it until confirmed. Turns are acknowledged in the order
their messages arrived, as MQTT asks of a receiver (3.1.1, 4.6), which also lets a batching service
commit state turn by turn knowing the earlier turns are done. The order is kept per **lane**: a
subscription may name a lane of its own when its messages are independent of the others' (memory's
requests beside its log), so a request that takes seconds never holds the acknowledgement of the log
entries committed meanwhile (which would fill the broker's in-flight window and stall the log).

Pure logic, single-threaded (the bus's network thread): no locks, no clock, no I/O; ``ack`` is
called for each message to acknowledge.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


class Turn:
    """Messages acknowledged together, and what still holds them."""

    __slots__ = ("holds", "lane", "messages", "on_done", "sealed")

    def __init__(self, lane: str = "") -> None:
        self.lane = lane
        self.messages: list[tuple[int, int]] = []
        """(mid, qos) of each received QoS 1+ message to acknowledge."""
        self.holds = 0
        self.sealed = False
        self.on_done: list[Callable[[], None]] | None = None
        """Run when acknowledged (a batching service commits the turn's state then)."""

    @property
    def done(self) -> bool:
        return self.sealed and self.holds == 0

    def __repr__(self) -> str:
        return f"Turn(messages={len(self.messages)}, holds={self.holds}, sealed={self.sealed})"


class AckTracker:
    def __init__(self, ack: Callable[[int, int], None]) -> None:
        self._ack = ack
        self._lanes: dict[str, deque[Turn]] = {"": deque()}
        self._open: Turn | None = None
        self._by_mid: dict[int, list[Turn] | Turn] = {}
        self.acknowledged = 0

    # --- receiving -------------------------------------------------------------------------------
    def single(self, mid: int, qos: int, lane: str = "") -> Turn:
        """A turn of its own for one message (sealed by :meth:`seal` when its handler returns),
        acknowledged in order with the other turns of its ``lane``."""
        t = Turn(lane)
        if qos:
            t.messages.append((mid, qos))
        turns = self._lanes.get(lane)
        if turns is None:
            turns = self._lanes[lane] = deque()
        turns.append(t)
        return t

    def batched(self, mid: int, qos: int) -> Turn:
        """The open batch turn, with this message in it (sealed by :meth:`seal_batch`)."""
        t = self._open
        if t is None:
            t = self._open = Turn()
            self._lanes[""].append(t)
        if qos:
            t.messages.append((mid, qos))
        return t

    @property
    def open_batch(self) -> Turn | None:
        return self._open

    # --- what holds a turn -----------------------------------------------------------------------
    def hold(self, turn: Turn) -> None:
        turn.holds += 1

    def release(self, turn: Turn) -> None:
        turn.holds -= 1
        if turn.holds == 0 and turn.sealed:
            self._advance(turn.lane)

    def track(self, mid: int, turns: Turn | Iterable[Turn]) -> None:
        """The QoS 1 publish ``mid`` holds ``turns`` until :meth:`published` says it is confirmed."""
        if isinstance(turns, Turn):
            turns.holds += 1
            self._by_mid[mid] = turns
            return
        held = list(dict.fromkeys(turns))
        if not held:
            return
        for t in held:
            t.holds += 1
        self._by_mid[mid] = held[0] if len(held) == 1 else held

    def published(self, mid: int) -> None:
        """The broker confirmed publish ``mid`` (a mid nobody tracks is ignored)."""
        held = self._by_mid.pop(mid, None)
        if held is None:
            return
        for t in held if isinstance(held, list) else (held,):
            t.holds -= 1
            if t.holds == 0 and t.sealed:
                self._advance(t.lane)

    # --- sealing ---------------------------------------------------------------------------------
    def seal(self, turn: Turn) -> None:
        turn.sealed = True
        if turn.holds == 0:
            self._advance(turn.lane)

    def seal_batch(self, on_done: Callable[[], None] | None = None) -> Turn | None:
        """Close the open batch turn (after the commit or flush that made its messages safe);
        ``on_done`` runs when it is acknowledged."""
        t = self._open
        if t is None:
            return None
        self._open = None
        if on_done is not None:
            t.on_done = [on_done]
        self.seal(t)
        return t

    def _advance(self, lane: str) -> None:
        turns = self._lanes[lane]
        while turns and turns[0].done:
            t = turns.popleft()
            for mid, qos in t.messages:
                self._ack(mid, qos)
            self.acknowledged += len(t.messages)
            for fn in t.on_done or ():
                fn()

    # --- inspection ------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Turns not yet acknowledged (the open batch included)."""
        return sum(len(turns) for turns in self._lanes.values())

    def stats(self) -> dict[str, Any]:
        return {"turns_waiting": self.waiting, "publishes_waiting": len(self._by_mid)}
