"""Metric primitives: counters and latency histograms (HdrHistogram) with p50/p99.

Services keep one :class:`Metrics` registry, increment it on their hot path (plain ints and one
histogram record, no locks: each registry is updated from one thread) and publish ``snapshot()``
on ``.../metrics/{service}`` every few seconds. Metric names are listed in docs/metrics.md.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

from outpost.sketch import IntervalSketcher, to_wire

# Latencies are recorded in microseconds, 1 us .. 60 s, 3 significant digits.
_LOWEST_US = 1
_HIGHEST_US = 60_000_000
_DIGITS = 3


class Histogram:
    """A latency histogram in microseconds."""

    __slots__ = ("_h", "_sketcher")

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)
        self._sketcher: IntervalSketcher | None = None

    def take_sketch(self) -> dict[str, Any] | None:
        """What was recorded since the previous call, as a mergeable sketch in ms (the ``Sketch``
        contract, outpost.sketch); None when nothing was. The first call takes everything so far."""
        if self._sketcher is None:
            self._sketcher = IntervalSketcher(self._h)
        s = self._sketcher.take()
        return None if s is None else to_wire(s)

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

    def take_sketches(self) -> dict[str, dict[str, Any]]:
        """Each histogram's interval sketch (:meth:`Histogram.take_sketch`), for the metrics batch:
        only those that recorded something since the previous call."""
        out = {}
        for name, h in sorted(self.histograms.items()):
            s = h.take_sketch()
            if s is not None:
                out[name] = s
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "counters": dict(sorted(self.counters.items())),
            "histograms": {name: h.summary() for name, h in sorted(self.histograms.items())},
        }


_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 1e6 if hasattr(os, "sysconf") else 0.0


def process_usage() -> dict[str, float]:
    """This process's CPU time so far (user + system, s: its rate is the CPU share) and resident
    memory now (MB, from /proc; the peak where /proc is missing), for the metrics batch's state."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm", "rb") as f:
            rss_mb = int(f.read().split()[1]) * _PAGE_MB
    except OSError:
        rss_mb = ru.ru_maxrss / 1000.0  # kB on Linux
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "rss_mb": round(rss_mb, 1)}
