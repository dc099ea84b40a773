"""A device's output as MQTT payloads: good readings batched, bad items mixed in, all counted.

Kept apart from the publisher so the exact bytes a run would send can be produced (and checked
against ingest's parser) without a broker.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from outpost.contracts import ReadingDict
from outpost.sim.badinput import ALL_KINDS, MESSAGE_LEVEL, BadKind, Injector, make_bad
from outpost.sim.scenario import SimDevice


@dataclass(slots=True)
class Outgoing:
    """One telemetry message: its bytes, how many good readings it holds, and its bad items."""

    payload: bytes
    readings: int
    bad: list[BadKind] = field(default_factory=list)


class DeviceStream:
    """Turns a device's readings into messages of ``batch`` item slots.

    Each slot is a good reading, or (with probability ``bad_ratio``) a bad item. A batch is a JSON
    list even when it holds one item; ``batch=1`` sends bare reading objects. Message-level bad
    kinds become messages of their own so they never take good readings down with them."""

    def __init__(
        self,
        device: SimDevice,
        *,
        seed: int,
        batch: int = 1,
        bad_ratio: float = 0.0,
        bad_kinds: Sequence[BadKind] = ALL_KINDS,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.device = device
        self.batch = batch
        self.injector = Injector(random.Random(f"outpost-sim-bad:{seed}:{device.id}"), bad_ratio, bad_kinds)
        self._pending: deque[ReadingDict] = deque()
        self._last_good: bytes | None = None

    def _next_reading(self, ts_ns: int | None) -> ReadingDict:
        if not self._pending:
            self._pending.extend(self.device.next_readings(ts_ns))
        return self._pending.popleft()

    def take(self, slots: int, ts_ns: int | None = None) -> list[Outgoing]:
        """Messages for the next ``slots`` items (at most ``batch`` of them go into one batch
        message; message-level bad items add messages of one item each)."""
        out: list[Outgoing] = []
        parts: list[bytes] = []
        good = 0
        bad_in_batch: list[BadKind] = []
        draw = self.injector.draw
        for _ in range(slots):
            kind = draw(can_duplicate=self._last_good is not None)
            if kind is None:
                encoded = orjson.dumps(self._next_reading(ts_ns))
                parts.append(encoded)
                self._last_good = encoded
                good += 1
                continue
            data = make_bad(
                kind,
                self.device.template(ts_ns),
                self.injector.rng,
                last_good=self._last_good,
            )
            if kind in MESSAGE_LEVEL:
                out.append(Outgoing(data, 0, [kind]))
            else:
                parts.append(data)
                bad_in_batch.append(kind)
        if parts:
            payload = parts[0] if self.batch == 1 and len(parts) == 1 else b"[" + b",".join(parts) + b"]"
            out.append(Outgoing(payload, good, bad_in_batch))
        return out


def count(messages: Sequence[Outgoing]) -> tuple[int, Counter[str]]:
    """(good readings, bad items by kind) in some messages."""
    bad: Counter[str] = Counter()
    good = 0
    for m in messages:
        good += m.readings
        bad.update(str(k) for k in m.bad)
    return good, bad
