"""The interval sketches services put in their metrics batches (outpost.sketch): merged across
intervals and histograms, their quantiles stay within the promised relative error of the exact
ones, which an average of per-interval percentiles does not."""

from __future__ import annotations

import random

import pytest

from outpost.contracts import MetricsBatch, Sketch
from outpost.metrics import Histogram, Metrics
from outpost.sketch import ALPHA, from_wire, new_sketch, quantile, to_wire


def _exact(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[int(q * (len(s) - 1))]


def test_merged_interval_sketches_match_exact_quantiles() -> None:
    rnd = random.Random(7)
    a, b = Histogram(), Histogram()
    recorded: list[float] = []
    merged = new_sketch()
    for interval in range(6):
        for h in (a, b):
            # one service slow in some intervals: the merged tail must show it
            scale = 40.0 if (h is b and interval % 3 == 0) else 1.0
            for _ in range(3000):
                ms = rnd.lognormvariate(0.5, 0.8) * scale
                h.record_us(ms * 1000)
                recorded.append(ms)
            wire = h.take_sketch()
            assert wire is not None
            merged.merge(from_wire(Sketch.model_validate(wire)))
    assert merged.count == len(recorded)
    for q in (0.5, 0.95, 0.99):
        exact = _exact(recorded, q)
        assert abs(quantile(merged, q) - exact) / exact <= ALPHA + 0.002


def test_an_interval_holds_only_what_was_recorded_in_it() -> None:
    h = Histogram()
    assert h.take_sketch() is None
    h.record_us(2000)
    first = h.take_sketch()
    assert first is not None and first["count"] == 1
    assert h.take_sketch() is None
    h.record_us(10_000)
    h.record_us(10_000)
    second = h.take_sketch()
    assert second is not None and second["count"] == 2
    assert second["min_ms"] == pytest.approx(10.0, rel=0.01)
    h.reset()
    h.record_us(500)
    after_reset = h.take_sketch()
    assert after_reset is not None and after_reset["count"] == 1


def test_wire_round_trip_and_refusals() -> None:
    s = new_sketch()
    for v in (0.5, 1.0, 250.0, 250.0, 9000.0):
        s.add(v)
    back = from_wire(to_wire(s))
    assert back.count == 5 and back.sum == pytest.approx(s.sum, abs=0.01)
    assert quantile(back, 0.5) == pytest.approx(quantile(s, 0.5))
    wire = to_wire(s)
    with pytest.raises(ValueError, match="relative accuracy"):
        from_wire({**wire, "alpha": 0.01})
    with pytest.raises(ValueError, match="length"):
        from_wire({**wire, "counts": wire["counts"][:-1]})
    assert quantile(new_sketch(), 0.99) == 0.0


def test_the_metrics_batch_carries_sketches() -> None:
    m = Metrics("svc")
    m.histogram("lat").record_us(1500)
    batch = {
        "id": "x",
        "ts": 1,
        "trace": "",
        "started": 1,
        **m.snapshot(),
        "sketches": m.take_sketches(),
    }
    parsed = MetricsBatch.model_validate(batch)
    assert parsed.sketches["lat"].count == 1
    assert m.take_sketches() == {}
