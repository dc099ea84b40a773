"""Mergeable latency sketches: what a histogram recorded in one metrics interval, as the bins of a
DDSketch, so that the telemetry service can merge intervals, services and devices and still read
p50/p95/p99 to within :data:`ALPHA` of the exact value (a property of DDSketch that averages of
percentiles do not have: the p99 of a minute is not the mean of twelve 5-second p99s).

The services keep their HdrHistograms (one cheap record on the hot path, 3 significant digits).
At each metrics publish, :class:`IntervalSketcher` takes the counts recorded since the previous
publish (the difference of the HDR counts arrays, nothing on the hot path) and puts each non-empty
HDR bucket's middle value into a DDSketch with its count. An HDR bucket is at most 0.1% wide and a
DDSketch bin 2*ALPHA wide (relative), so a quantile read from the merged sketch is within
ALPHA + 0.1% of the exact one.

On the wire (``MetricsBatch.sketches``, :class:`outpost.contracts.Sketch`) a sketch is its
non-empty bin keys and counts under the logarithmic mapping of relative accuracy ``alpha``, plus
count, sum, min and max: a few hundred bytes for a minute of latencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping
from hdrh.histogram import HdrHistogram

ALPHA = 0.005
"""Relative accuracy of every sketch Outpost makes (0.5%): a quantile read back is within 0.5% of a
value the sketch holds at that rank."""

_MAPPING = LogarithmicMapping(ALPHA)


def new_sketch() -> DDSketch:
    return DDSketch(ALPHA)


def to_wire(sketch: DDSketch) -> dict[str, Any]:
    """The wire form of ``sketch`` (made with :func:`new_sketch`): the ``Sketch`` contract."""
    keys: list[int] = []
    counts: list[int] = []
    store = sketch._store  # DenseStore: bins[i] holds the count of key offset + i
    for i, c in enumerate(store.bins):
        if c:
            keys.append(store.offset + i)
            counts.append(round(c))
    return {
        "alpha": ALPHA,
        "count": round(sketch.count),
        "zeros": round(sketch._zero_count),
        "sum_ms": round(sketch.sum, 3),
        "min_ms": round(sketch._min, 3) if sketch.count else 0.0,
        "max_ms": round(sketch._max, 3) if sketch.count else 0.0,
        "keys": keys,
        "counts": counts,
    }


def from_wire(wire: dict[str, Any] | Any) -> DDSketch:
    """The DDSketch a wire form stands for (a dict or a ``Sketch`` model), ready to merge. Raises
    ValueError for one made with another relative accuracy (its bins would not line up) or whose
    keys and counts disagree."""
    d = wire if isinstance(wire, dict) else wire.model_dump()
    if abs(float(d["alpha"]) - ALPHA) > 1e-12:
        raise ValueError(f"sketch relative accuracy {d['alpha']} is not {ALPHA}")
    keys, counts = d["keys"], d["counts"]
    if len(keys) != len(counts):
        raise ValueError("sketch keys and counts differ in length")
    s = new_sketch()
    for key, count in zip(keys, counts, strict=True):
        if count > 0:
            s._store.add(int(key), float(count))
    zeros = float(d.get("zeros", 0))
    s._zero_count = zeros
    s._count = float(sum(c for c in counts if c > 0)) + zeros
    s._sum = float(d["sum_ms"])
    if s._count:
        s._min = float(d["min_ms"])
        s._max = float(d["max_ms"])
    return s


def quantile(sketch: DDSketch, q: float) -> float:
    """The ``q`` quantile (0..1) of ``sketch``; 0.0 for an empty one."""
    if not sketch.count:
        return 0.0
    v = sketch.get_quantile_value(q)
    return float(v) if v is not None else 0.0


class IntervalSketcher:
    """Turns a cumulative HdrHistogram (microseconds) into one sketch (milliseconds) per interval:
    each call to :meth:`take` gives what was recorded since the previous call. Called from the
    thread that records into the histogram (the metrics publish runs on the network thread)."""

    __slots__ = ("_hist", "_prev")

    def __init__(self, hist: HdrHistogram) -> None:
        self._hist = hist
        self._prev = np.zeros(hist.counts_len, dtype=np.uint64)

    def take(self) -> DDSketch | None:
        """The interval's sketch, or None when nothing was recorded in it."""
        now = np.ctypeslib.as_array(self._hist.counts).copy()
        if now.sum() < self._prev.sum():  # the histogram was reset: all of it is new
            self._prev[:] = 0
        delta = now - self._prev
        self._prev = now
        nonzero = np.flatnonzero(delta)
        if not len(nonzero):
            return None
        s = new_sketch()
        h = self._hist
        for i in nonzero:
            low = h.get_value_from_index(int(i))  # the bucket's lowest value
            us = (low + h.get_highest_equivalent_value(low)) / 2.0
            s.add(us / 1000.0, float(delta[i]))
        return s


def key_of(value_ms: float) -> int:
    """The bin key of a value (for tests and for reading a wire form by hand)."""
    return int(_MAPPING.key(value_ms))
