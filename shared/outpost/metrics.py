"""Metric primitives: counters and latency histograms (HdrHistogram) with p50/p99.

Services keep one :class:`Metrics` registry, increment it on their hot path (plain ints and one
histogram record, no locks: each registry is updated from one thread) and publish ``snapshot()``
on ``.../metrics/{service}`` every few seconds. Metric names are listed in docs/metrics.md.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

# Latencies are recorded in microseconds, 1 us .. 60 s, 3 significant digits.
_LOWEST_US = 1
_HIGHEST_US = 60_000_000
_DIGITS = 3


class Histogram:
    """A latency histogram in microseconds."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)

    def record_ns(self, ns: int, count: int = 1) -> None:
        """Record ``count`` values of ``ns`` at once (readings of one message that share a timestamp
        share their age: one record of (age, n) leaves the histogram as n records would)."""
        self._h.record_value(min(max(ns // 1000, _LOWEST_US), _HIGHEST_US), count)

    def record_us(self, us: float) -> None:
        self._h.record_value(min(max(int(us), _LOWEST_US), _HIGHEST_US))

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile_ms(self, p: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self._h.get_value_at_percentile(p)) / 1000.0

    def summary(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50_ms": round(self.percentile_ms(50), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(float(self._h.get_max_value()) / 1000.0, 3) if self.count else 0.0,
        }

    def reset(self) -> None:
        self._h.reset()


class Metrics:
    """Named counters (with an optional label, e.g. a rejection reason) and histograms."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.counters: Counter[str] = Counter()
        self.histograms: dict[str, Histogram] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def histogram(self, name: str) -> Histogram:
        h = self.histograms.get(name)
        if h is None:
            h = self.histograms[name] = Histogram()
        return h

    def snapshot(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "counters": dict(sorted(self.counters.items())),
            "histograms": {name: h.summary() for name, h in sorted(self.histograms.items())},
        }
