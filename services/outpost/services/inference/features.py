"""Per-device sliding windows over events, and the feature vectors models read from them.

The service and the training script use this one module, so a model is served on exactly the
features it was trained on. A window is the last ``n`` canonical values of one (device, metric),
fed from ingest's events; a feature is one statistic of one window (see ``Stat`` in the manifest).

Nothing is ever filled in: a window with fewer readings than the manifest's ``min_readings`` makes
the event ``warming`` (counted, not scored); a statistic that comes out NaN or infinite is a
``bad_features`` error, dead-lettered with the reason.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from outpost.errors import OutpostError
from outpost.services.inference.manifest import Manifest

FloatArray32 = npt.NDArray[np.float32]


class FeatureError(OutpostError):
    """An event cannot be scored: ``reason`` is ``warming`` or ``bad_features``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Windows:
    """The last ``size`` values of every (device, metric), bounded in count of devices too."""

    __slots__ = ("_series", "dirty", "max_devices", "size")

    def __init__(self, size: int, *, max_devices: int = 100_000) -> None:
        self.size = size
        self.max_devices = max_devices
        self._series: dict[str, dict[str, deque[float]]] = {}
        self.dirty: set[tuple[str, str]] = set()
        """(device, metric) changed since the last checkpoint (:mod:`.windowstore`)."""

    def add(self, device: str, metric: str, value: float) -> None:
        per = self._series.get(device)
        if per is None:
            if len(self._series) >= self.max_devices:
                # bounded memory: forget the device seen first (dicts keep insertion order)
                del self._series[next(iter(self._series))]
            per = self._series[device] = {}
        d = per.get(metric)
        if d is None:
            d = per[metric] = deque(maxlen=self.size)
        d.append(value)
        self.dirty.add((device, metric))

    def series(self, device: str, metric: str) -> deque[float] | None:
        per = self._series.get(device)
        return None if per is None else per.get(metric)

    def resize(self, size: int) -> None:
        """Grow (or shrink) every window, keeping the newest values."""
        if size == self.size:
            return
        self.size = size
        for per in self._series.values():
            for metric, d in per.items():
                per[metric] = deque(d, maxlen=size)

    @property
    def devices(self) -> int:
        return len(self._series)


def _stat(stat: str, values: Sequence[float]) -> float:
    """One statistic of a window, each with a C-level builtin (a window is tens of values, and this
    runs for every scored event: docs/benchmarks.md has the profile)."""
    if stat == "last":
        return values[-1]
    if stat == "mean":
        return sum(values) / len(values)
    if stat == "min":
        return min(values)
    if stat == "max":
        return max(values)
    if stat == "range":
        return max(values) - min(values)
    if stat == "delta":
        return values[-1] - values[0]
    if stat == "count":
        return float(len(values))
    # std, two-pass (no cancellation for values far from zero with a small spread)
    mean = sum(values) / len(values)
    dev = [v - mean for v in values]
    var = sum(map(operator.mul, dev, dev)) / len(values)
    return math.sqrt(var) if var > 0.0 else 0.0


def feature_vector(manifest: Manifest, windows: Windows, device: str) -> list[float]:
    """The model's input row for ``device`` now; FeatureError when it cannot be made."""
    n = manifest.window
    series: dict[str, Sequence[float]] = {}
    for metric in manifest.metrics:
        d = windows.series(device, metric)
        have = 0 if d is None else len(d)
        if d is None or have < manifest.min_readings:
            raise FeatureError(
                "warming", f"{device}: {metric} window has {have} of {manifest.min_readings} readings"
            )
        series[metric] = d if have <= n else list(d)[-n:]
    row = [_stat(f.stat, series[f.metric]) for f in manifest.features]
    if not math.isfinite(math.fsum(row)):  # one check for the row; fsum of finite values overflows
        for f, v in zip(manifest.features, row, strict=True):  # only at the float limit: then look
            if not math.isfinite(v):
                raise FeatureError("bad_features", f"{device}: {f.stat}({f.metric}) is {v}")
    return row


# --- the serving path: snapshot on intake, statistics for a whole batch at once -------------------

Snapshot = dict[str, tuple[float, ...]]
"""The window values of one device at the moment its event arrived, by metric."""


def snapshot(
    metrics: Sequence[str], window: int, min_readings: int, windows: Windows, device: str
) -> Snapshot:
    """What a request carries: a copy of each window (its last ``window`` values), taken when the
    event arrives, so later events cannot change the features it is scored on. Copying a window is
    ~0.3 us; the statistics are computed later for the whole batch (:func:`feature_matrix`)."""
    out: Snapshot = {}
    for metric in metrics:
        d = windows.series(device, metric)
        have = 0 if d is None else len(d)
        if d is None or have < min_readings:
            raise FeatureError("warming", f"{device}: {metric} window has {have} of {min_readings} readings")
        out[metric] = tuple(d) if have <= window else tuple(d)[-window:]
    return out


def _column(stat: str, a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    col: npt.NDArray[np.float64]
    if stat == "last":
        col = a[:, -1]
    elif stat == "mean":
        col = a.mean(axis=1)
    elif stat == "std":
        col = a.std(axis=1)  # two-pass, population (ddof 0), as _stat
    elif stat == "min":
        col = a.min(axis=1)
    elif stat == "max":
        col = a.max(axis=1)
    elif stat == "range":
        col = a.max(axis=1) - a.min(axis=1)
    elif stat == "delta":
        col = a[:, -1] - a[:, 0]
    else:  # count
        col = np.full(a.shape[0], float(a.shape[1]))
    return col


def feature_matrix(
    manifest: Manifest, snapshots: Sequence[Snapshot]
) -> tuple[FloatArray32, list[str | None]]:
    """The input rows of a batch, computed with numpy over all its snapshots at once: the same
    values as :func:`feature_vector` row by row (``tests/unit/test_features.py`` checks it), a
    fraction of the cost. Also, per row, why it cannot be scored (a non-finite statistic) or None."""
    n, width = manifest.window, len(manifest.features)
    rows = len(snapshots)
    out = np.empty((rows, width), dtype=np.float64)
    for metric in manifest.metrics:
        cols = [i for i, f in enumerate(manifest.features) if f.metric == metric]
        values = [s[metric][-n:] for s in snapshots]
        lengths = {len(v) for v in values}
        groups = (
            [range(rows)]
            if len(lengths) == 1
            else [[i for i, v in enumerate(values) if len(v) == k] for k in lengths]
        )
        for group in groups:
            idx = list(group)
            a = np.array([values[i] for i in idx], dtype=np.float64)
            with np.errstate(all="ignore"):  # overflow shows as inf below, and is reported
                for j in cols:
                    out[idx, j] = _column(manifest.features[j].stat, a)
    with np.errstate(over="ignore"):  # beyond float32's range is inf: what the model would see
        x = out.astype(np.float32)
    problems: list[str | None] = [None] * rows
    finite = np.isfinite(x)
    if not finite.all():
        for i in np.flatnonzero(~finite.all(axis=1)):
            j = int(np.flatnonzero(~finite[i])[0])
            f = manifest.features[j]
            problems[int(i)] = f"{f.stat}({f.metric}) is {out[i, j]} (float32: {x[i, j]})"
    return x, problems
