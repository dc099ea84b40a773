"""Counters and latency histograms (p50/p99)."""

from __future__ import annotations

import math

import orjson

from outpost.metrics import Histogram, Metrics


def test_percentiles() -> None:
    h = Histogram()
    for ms in range(1, 1001):
        h.record_us(ms * 1000)
    assert h.count == 1000
    assert math.isclose(h.percentile_ms(50), 500, rel_tol=0.01)
    assert math.isclose(h.percentile_ms(99), 990, rel_tol=0.01)
    s = h.summary()
    assert math.isclose(s["p50_ms"], 500, rel_tol=0.01)
    assert math.isclose(s["p99_ms"], 990, rel_tol=0.01)
    assert math.isclose(s["max_ms"], 1000, rel_tol=0.01)


def test_skewed_distribution() -> None:
    h = Histogram()
    for _ in range(980):
        h.record_ns(200_000)  # 0.2 ms
    for _ in range(20):
        h.record_ns(50_000_000)  # 50 ms: the slowest 2%
    assert math.isclose(h.percentile_ms(50), 0.2, rel_tol=0.01)
    assert math.isclose(h.percentile_ms(99), 50, rel_tol=0.01)


def test_empty_and_out_of_range() -> None:
    h = Histogram()
    assert h.summary() == {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    h.record_ns(-5)  # clock skew: clamped, never raises
    h.record_ns(10**15)  # way past the range: clamped
    h.record_us(0.1)
    assert h.count == 3
    assert h.percentile_ms(100) <= 60_000 * 1.01
    h.reset()
    assert h.count == 0


def test_metrics_snapshot_is_json() -> None:
    m = Metrics("ingest")
    m.inc("rejected.not_json")
    m.inc("rejected.not_json", 2)
    m.inc("events", 5)
    m.histogram("lat").record_us(1500)
    assert m.histogram("lat") is m.histogram("lat")
    snap = orjson.loads(orjson.dumps(m.snapshot()))
    assert snap["service"] == "ingest"
    assert snap["counters"] == {"events": 5, "rejected.not_json": 3}
    assert list(snap["counters"]) == sorted(snap["counters"])
    assert snap["histograms"]["lat"]["count"] == 1
    assert math.isclose(snap["histograms"]["lat"]["p50_ms"], 1.5, rel_tol=0.01)
