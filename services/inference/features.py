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

from outpost.errors import OutpostError
from outpost.services.inference.manifest import Manifest


class FeatureError(OutpostError):
    """An event cannot be scored: ``reason`` is ``warming`` or ``bad_features``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Windows:
    """The last ``size`` values of every (device, metric), bounded in count of devices too."""

    __slots__ = ("_series", "max_devices", "size")

    def __init__(self, size: int, *, max_devices: int = 100_000) -> None:
        self.size = size
        self.max_devices = max_devices
        self._series: dict[str, dict[str, deque[float]]] = {}

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
