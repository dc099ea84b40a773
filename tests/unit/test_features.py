"""Windows and features: the batch path the service serves on computes what the row-by-row path
the models were trained on computes; nothing is filled in; memory stays bounded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from outpost.services.inference.features import (
    FeatureError,
    Windows,
    feature_matrix,
    feature_vector,
    snapshot,
)
from outpost.services.inference.manifest import Manifest, read_manifest
from outpost.services.inference.registry import PACKAGED_MODELS


def shipped() -> list[Manifest]:
    return [read_manifest(p) for p in sorted(PACKAGED_MODELS.glob("*/*")) if (p / "manifest.yaml").is_file()]


@pytest.mark.parametrize("manifest", shipped(), ids=lambda m: m.ref)
def test_batch_features_equal_row_features(manifest: Manifest) -> None:
    rng = np.random.default_rng(3)
    w = Windows(manifest.window)
    devices = [f"dev-{i}" for i in range(40)]
    for i, d in enumerate(devices):
        # ragged: devices filled to different lengths, some past the window
        for k in range(manifest.min_readings + i % (manifest.window + 5)):
            for metric in manifest.metrics:
                w.add(d, metric, float(rng.normal(20, 5)) + k * 0.01)
    snaps = [snapshot(manifest.metrics, manifest.window, manifest.min_readings, w, d) for d in devices]
    x, problems = feature_matrix(manifest, snaps)
    assert problems == [None] * len(devices)
    assert x.dtype == np.float32 and x.shape == (len(devices), len(manifest.features))
    for i, d in enumerate(devices):
        expected = np.asarray(feature_vector(manifest, w, d), dtype=np.float32)
        np.testing.assert_allclose(x[i], expected, rtol=1e-6, atol=1e-6)


def test_warming_is_an_error_not_a_zero() -> None:
    m = shipped()[0]
    w = Windows(m.window)
    for metric in m.metrics:
        for _ in range(m.min_readings - 1):
            w.add("d", metric, 1.0)
    with pytest.raises(FeatureError) as e:
        feature_vector(m, w, "d")
    assert e.value.reason == "warming"
    with pytest.raises(FeatureError):
        snapshot(m.metrics, m.window, m.min_readings, w, "d")
    with pytest.raises(FeatureError):
        snapshot(m.metrics, m.window, m.min_readings, w, "never-seen")


def test_non_finite_and_float32_overflow_are_reported_per_row() -> None:
    m = next(x for x in shipped() if x.name == "shelf-stock")
    w = Windows(m.window)
    for k in range(m.window):
        w.add("ok", "shelf_weight", 5.0 + k)
        w.add("huge", "shelf_weight", 1e300 * (-1) ** k)  # finite, std overflows
        w.add("big", "shelf_weight", 1e39)  # finite in float64, inf in float32
    snaps = [snapshot(m.metrics, m.window, m.min_readings, w, d) for d in ("ok", "huge", "big")]
    x, problems = feature_matrix(m, snaps)
    assert problems[0] is None and np.isfinite(x[0]).all()
    assert problems[1] is not None and problems[2] is not None and "float32" in problems[2]
    with pytest.raises(FeatureError) as e:
        feature_vector(m, w, "huge")
    assert e.value.reason == "bad_features"


def test_windows_are_bounded_and_keep_the_newest() -> None:
    w = Windows(4, max_devices=3)
    for d in ("a", "b", "c", "d"):
        for v in range(10):
            w.add(d, "m", float(v))
    assert w.devices == 3 and w.series("a", "m") is None
    assert list(w.series("d", "m") or []) == [6.0, 7.0, 8.0, 9.0]
    w.resize(2)
    assert list(w.series("d", "m") or []) == [8.0, 9.0]
    w.resize(6)
    w.add("d", "m", 10.0)
    assert list(w.series("d", "m") or []) == [8.0, 9.0, 10.0]


def test_std_has_no_cancellation_far_from_zero() -> None:
    m = next(x for x in shipped() if x.name == "shelf-stock")
    w = Windows(m.window)
    for k in range(m.window):
        w.add("d", "shelf_weight", 1e9 + (k % 2))
    stds = [v for f, v in zip(m.features, feature_vector(m, w, "d"), strict=True) if f.stat == "std"]
    assert stds and all(math.isclose(s, 0.5, rel_tol=1e-6) for s in stds)


def test_window_checkpoint_round_trip_and_damaged_rows(tmp_path: Path) -> None:
    from outpost.services.inference.windowstore import WindowStore

    w = Windows(4)
    for v in range(6):
        w.add("d1", "m", float(v))
    w.add("d2", "m", 1.5)
    store = WindowStore(tmp_path / "w.db")
    assert store.save(w) == 2 and store.save(w) == 0  # only what changed is written
    store.store.db.execute("INSERT INTO windows VALUES ('d3', 'm', x'ff00')")
    store.close()
    back = Windows(4)
    store = WindowStore(tmp_path / "w.db")
    assert store.load(back) == 2
    assert list(back.series("d1", "m") or []) == [2.0, 3.0, 4.0, 5.0]
    assert list(back.series("d2", "m") or []) == [1.5]
    assert back.series("d3", "m") is None and not back.dirty
    store.close()
