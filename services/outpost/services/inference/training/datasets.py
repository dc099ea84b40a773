"""Deterministic labelled data sets drawn from the device simulator, for training and evaluation.

Rows are made exactly as the inference service makes them at serve time: every reading of every
device is converted to its canonical unit the way ingest converts it, fed into one
:class:`~outpost.services.inference.features.Windows` of the manifest's size, and each reading that
matches the manifest's trigger yields :func:`~outpost.services.inference.features.feature_vector`
(readings whose windows are still warming are skipped, as the service skips them). The label is the
simulator's ground truth for that device at that step, chosen by the manifest's name in
:data:`LABELERS`.

Only numpy and Outpost modules are imported here (no scikit-learn), so ``outpost model quantize``
can measure a model's accuracy on held-out data on a machine that cannot train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from outpost.services.inference.features import FeatureError, Windows, feature_vector
from outpost.services.inference.manifest import Manifest
from outpost.services.ingest.units import UNITS
from outpost.sim.profiles import ShelfWeight
from outpost.sim.scenario import SimDevice, build_fleet

START_NS: Final = 1_790_000_000 * 10**9
"""Fixed start of the virtual clock (timestamps never reach the features, but nothing here should
read the wall clock)."""

DEFAULT_ANOMALY_RATE: Final = 0.002
"""Chance per step that a healthy device starts an anomaly episode: the simulator's own default.

Episodes last hundreds of steps (fridge: 60-900, shelf: 60-600) and a new one can only start while
none is active, so the share of steps spent in an episode is ``L / (L + 1 / rate)`` for a mean
length ``L``: about 45 % for fridges and 40 % for shelves at this rate, which represents every label
well. Ten times this rate would leave only ~10 % normal fridge rows and ~13 % stocked shelf rows."""


def _fridge_label(device: SimDevice) -> str:
    """The fridge's active anomaly episode (``door_left_open``, ``compressor_fault``) or ``normal``."""
    return "normal" if device.anomaly is None else device.anomaly


def _shelf_label(device: SimDevice) -> str:
    """The tray's stock level: ``empty`` at 0 items, ``low`` below a fifth of capacity (where staff
    restock), ``in_stock`` otherwise."""
    profile = device.profile
    if not isinstance(profile, ShelfWeight):
        raise TypeError(
            f"{device.id}: shelf-stock labels need a shelf_weight device, not {device.profile_name}"
        )
    if profile.stock == 0:
        return "empty"
    if profile.stock < max(1, profile.capacity // 5):
        return "low"
    return "in_stock"


LABELERS: Final[dict[str, Callable[[SimDevice], str]]] = {
    "fridge-anomaly": _fridge_label,
    "shelf-stock": _shelf_label,
}
"""Ground truth per model name: the device, just stepped, to the label its last reading deserves."""


def _canonical(value: float, unit: str) -> float:
    """The value ingest would publish for this reading (same table, same arithmetic, same skip)."""
    _, scale, offset = UNITS[unit]
    if scale != 1.0 or offset != 0.0:
        return value * scale + offset
    return value


def dataset(
    manifest_like: Manifest,
    *,
    seed: int,
    steps: int,
    devices: int = 40,
    anomaly_rate: float = DEFAULT_ANOMALY_RATE,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Features and labels for ``manifest_like``'s model from a seeded retail fleet.

    Every one of ``devices`` devices is stepped ``steps`` times on the virtual clock. Returns ``X``
    (float32, shape ``(rows, len(features))``) and ``y`` (int64 indices into ``labels``). The same
    arguments give the same arrays, in every process.
    """
    try:
        labeler = LABELERS[manifest_like.name]
    except KeyError:
        raise ValueError(
            f"no ground truth for model {manifest_like.name!r}; known: {', '.join(LABELERS)}"
        ) from None
    if steps < 0:
        raise ValueError("steps must be >= 0")
    label_index = {label: i for i, label in enumerate(manifest_like.labels)}
    fleet = build_fleet(seed, devices, "retail", anomaly_rate=anomaly_rate, start_ns=START_NS)
    windows = Windows(manifest_like.window)
    trigger = manifest_like.trigger
    rows: list[list[float]] = []
    labels: list[int] = []
    for _ in range(steps):
        for device in fleet:
            for r in device.next_readings():
                dev, metric = r["device"], r["metric"]
                windows.add(dev, metric, _canonical(r["value"], r["unit"]))
                if not trigger.matches(dev, metric):
                    continue
                try:
                    row = feature_vector(manifest_like, windows, dev)
                except FeatureError as exc:
                    if exc.reason == "warming":
                        continue
                    raise
                label = labeler(device)
                try:
                    labels.append(label_index[label])
                except KeyError:
                    raise ValueError(
                        f"{dev}: ground truth {label!r} is not one of {manifest_like.ref}'s labels "
                        f"{manifest_like.labels}"
                    ) from None
                rows.append(row)
    n_features = len(manifest_like.features)
    x = np.asarray(rows, dtype=np.float32).reshape(len(rows), n_features)
    y = np.asarray(labels, dtype=np.int64)
    return x, y
