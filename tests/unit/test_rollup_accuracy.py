"""The benchmark's p99 check: latencies through Histogram -> take_sketch -> MetricsBatch -> Rollups
come back within the sketch's bound of the exact quantiles, window by window, service by service."""

from __future__ import annotations

import random

from outpost.benchmarks.rollup_accuracy import Sample, exact_quantile, rollup_accuracy

T0 = 1_800_000_000_000_000_000  # a window boundary of 10 s


def test_exact_quantile_is_ddsketchs_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert exact_quantile(values, 0.99) == 99.0  # floor(0.99 * 99) = 98 -> the 99th value
    assert exact_quantile(values, 0.5) == 50.0
    assert exact_quantile([], 0.99) == 0.0


def test_rolled_up_quantiles_stay_within_the_sketchs_bound() -> None:
    rng = random.Random(3)
    samples = [
        Sample(T0 + i * 2_000_000, int(rng.lognormvariate(1.2, 0.9) * 1e6), f"svc-{i % 3}")
        for i in range(30_000)  # 60 s at 500/s: six 10 s windows, three services
    ]
    got = rollup_accuracy(samples, site="s", window_s=10.0, interval_s=1.0)
    assert got["samples"] == 30_000
    # a batch goes to the window it arrives in: the one at 60 s (the last second) opens a 7th
    assert got["series_windows"] == 3 * 7
    assert got["counts_agree"] is True
    assert sum(w["count"] for w in got["windows"]) == 30_000
    assert got["p99_error_pct"] is not None and got["p99_error_pct"] <= 0.6  # 0.5% + 0.1% (HDR)
    assert got["p50_error_pct"] is not None and got["p50_error_pct"] <= 0.6


def test_no_samples_no_windows() -> None:
    got = rollup_accuracy([], site="s", window_s=10.0, interval_s=1.0)
    assert got["series_windows"] == 0 and got["p99_error_pct"] is None
