"""The upstream byte budget (``budget_bytes_per_min``): pure logic, the clock passed in.

A token bucket holds one window's bytes (``rollup_s`` at the budget's rate; at least one request
with a few lines) and refills at ``budget_bytes_per_min / 60`` a second. Each write request is
charged its points' line-protocol bytes (a newline each) plus :data:`REQUEST_BYTES` for the HTTP
request around them, so the bytes on the wire (what the tests count at the server) stay within the
budget. The priorities (:class:`~.catalog.Priority`):

1. **alerts** always go, whatever the bucket holds (it may go below zero: the SLO points then
   wait until it has refilled);
2. **SLO** points go oldest first while the bucket has room for them; the rest wait in the spool
   (deferred, never dropped for the budget) and go, in order, when there is room again;
3. **diagnostics** are thinned before they are spooled (:meth:`Budget.thin`): when a window's
   diagnostics do not fit in what a window's allowance leaves after its alerts and SLO points,
   each diagnostic series keeps one window in ``k`` (``k`` the smallest that fits; which window
   a series keeps is spread by a hash of the series, so every series still shows now and then).
   Those left out are counted as downsampled.

A budget of 0 means no limit: everything goes as it comes.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from outpost.services.telemetry.catalog import Point, Priority

REQUEST_BYTES = 512
"""What one write request costs besides its lines: the HTTP request line and headers that
influxdb-client sends (~400 bytes measured against VictoriaMetrics), rounded up."""

MAX_K = 1_000_000
"""Thinning beyond this keeps (practically) nothing: a window with no room for diagnostics."""


def size_of(p: Point) -> int:
    """Bytes a point costs on the wire: its line and a newline."""
    return len(p.line().encode()) + 1


@dataclass(frozen=True, slots=True)
class Pending:
    """A spooled point as the budget sees it: where it is (``seq``), its rank and its bytes."""

    seq: int
    priority: Priority
    size: int


class Budget:
    def __init__(self, bytes_per_min: int, window_s: float, *, request_bytes: int = REQUEST_BYTES) -> None:
        self.limited = bytes_per_min > 0
        self.rate = bytes_per_min / 60.0
        # one window's bytes may go at once (a window's points leave together), and at least one
        # request with some lines: a bucket smaller than that would never send anything
        self.capacity = max(self.rate * window_s, request_bytes + 2048.0)
        self.window_s = window_s
        self.request_bytes = request_bytes
        self.tokens = self.capacity
        self._last_ns: int | None = None

    def _refill(self, now_ns: int) -> None:
        if self._last_ns is not None and now_ns > self._last_ns:
            self.tokens = min(self.capacity, self.tokens + self.rate * (now_ns - self._last_ns) / 1e9)
        if self._last_ns is None or now_ns > self._last_ns:
            self._last_ns = now_ns

    def thin(self, points: Sequence[Point], window_index: int) -> tuple[list[Point], list[Point]]:
        """``(kept, downsampled)`` of one window's points: alerts and SLO points are all kept;
        diagnostics are thinned to what the window's allowance leaves. ``window_index``: the
        window's number (its start / its length), which picks the windows a series keeps."""
        if not self.limited:
            return list(points), []
        allowance = self.rate * self.window_s - self.request_bytes
        diag_bytes = 0
        for p in points:
            s = size_of(p)
            if p.priority is Priority.DIAGNOSTIC:
                diag_bytes += s
            else:
                allowance -= s
        if diag_bytes == 0 or diag_bytes <= allowance:
            return list(points), []
        k = MAX_K if allowance <= 0 else min(MAX_K, math.ceil(diag_bytes / allowance))
        kept: list[Point] = []
        dropped: list[Point] = []
        for p in points:
            if (
                p.priority is not Priority.DIAGNOSTIC
                or (window_index + zlib.crc32(p.series.encode())) % k == 0
            ):
                kept.append(p)
            else:
                dropped.append(p)
        return kept, dropped

    def take(self, pending: Sequence[Pending], now_ns: int, *, most: int) -> list[Pending]:
        """What of ``pending`` (oldest first) may be written now, at most ``most`` points: every
        alert, then SLO points, then diagnostics, each in order while the bucket has room (the
        first that does not fit stops its priority: order is kept). Charged at once; give back
        with :meth:`refund` when the write fails."""
        self._refill(now_ns)
        if not self.limited:
            return list(pending[:most])
        chosen: list[Pending] = []
        room = self.tokens - self.request_bytes
        for p in pending:
            if p.priority is Priority.ALERT and len(chosen) < most:
                chosen.append(p)
                room -= p.size
        for prio in (Priority.SLO, Priority.DIAGNOSTIC):
            for p in pending:
                if p.priority is not prio:
                    continue
                if len(chosen) >= most or p.size > room:
                    break
                chosen.append(p)
                room -= p.size
            else:
                continue
            break  # an SLO point that did not fit: diagnostics wait behind it
        if chosen:
            self.tokens -= self.request_bytes + sum(p.size for p in chosen)
        return chosen

    def refund(self, taken: Sequence[Pending]) -> None:
        """A write that failed: what :meth:`take` charged for it is given back."""
        if taken and self.limited:
            self.tokens = min(self.capacity, self.tokens + self.request_bytes + sum(p.size for p in taken))
