"""Train the committed inference models on simulator data and write them with their manifests.

    python -m outpost.services.inference.training.train [--out DIR] [--only NAME@VERSION]

Each model is a scikit-learn ``StandardScaler`` + ``MLPClassifier`` trained on
``dataset(seed=1)`` and scored on the held-out ``dataset(seed=2)``, then rebuilt as a plain ONNX
graph (:func:`~outpost.services.inference.training.graph.mlp_to_onnx`) whose probabilities must
match scikit-learn's within 1e-4 before anything is written. Output:
``{out}/{name}/{version}/model.onnx`` and ``manifest.yaml``. Everything is seeded and the ONNX
bytes carry no timestamp, so running this twice writes byte-identical models.

Needs the dev extras (scikit-learn); serving the models does not.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from outpost.services.inference.manifest import Feature, Manifest, Trigger, sha256_of, write_manifest
from outpost.services.inference.training.datasets import DEFAULT_ANOMALY_RATE, dataset
from outpost.services.inference.training.graph import mlp_to_onnx

DEFAULT_OUT: Final = Path(__file__).resolve().parents[1] / "models"
TRAIN_SEED: Final = 1
HELDOUT_SEED: Final = 2
DEVICES: Final = 40
RANDOM_STATE: Final = 0
PARITY_ATOL: Final = 1e-4
PLACEHOLDER_SHA: Final = "0" * 64


@dataclass(frozen=True, slots=True)
class Spec:
    """One model to train: its manifest (checksum still a placeholder) and how to train it."""

    manifest: Manifest
    hidden: tuple[int, ...]
    steps: int
    """Simulator steps of the training fleet; the held-out fleet runs half as many."""
    max_iter: int = 200
    batch_size: int = 200
    learning_rate: float = 1e-3


@dataclass(frozen=True, slots=True)
class Result:
    ref: str
    hidden: tuple[int, ...]
    train_rows: int
    heldout_rows: int
    accuracy: float
    majority: float
    recall: dict[str, float]
    epochs: int
    size: int
    seconds: float
    path: Path


def _features(metrics: Sequence[str], stats: Sequence[str]) -> list[Feature]:
    return [Feature.model_validate({"metric": m, "stat": s}) for m in metrics for s in stats]


FRIDGE_FEATURES: Final = _features(
    ("temperature", "humidity", "vibration", "door"), ("last", "mean", "std", "range")
)
SHELF_FEATURES: Final = _features(("shelf_weight",), ("last", "mean", "std", "min", "max", "range", "delta"))


def _fridge(version: str, description: str) -> Manifest:
    return Manifest(
        name="fridge-anomaly",
        version=version,
        sha256=PLACEHOLDER_SHA,
        description=description,
        trigger=Trigger(metric="door", device="fridge-*"),
        window=16,
        min_readings=4,
        features=FRIDGE_FEATURES,
        labels=["normal", "door_left_open", "compressor_fault"],
        normal_label="normal",
        threshold=0.5,
    )


SPECS: Final[tuple[Spec, ...]] = (
    Spec(
        _fridge(
            "1.0.0",
            "Display fridge faults from its controller's last 16 steps (temperature, humidity, "
            "compressor vibration, door): a door left open, or a compressor that shakes but no longer cools.",
        ),
        hidden=(64, 64),
        steps=3000,
    ),
    Spec(
        _fridge(
            "1.1.0",
            "Display fridge faults (same features and labels as 1.0.0): a smaller network with one "
            "hidden layer, trained on twice the data.",
        ),
        hidden=(32,),
        steps=6000,
    ),
    Spec(
        Manifest(
            name="shelf-stock",
            version="1.0.0",
            sha256=PLACEHOLDER_SHA,
            description="Stock level of a shelf tray from its load cell's last 32 readings (kg).",
            trigger=Trigger(metric="shelf_weight", device="shelf-*"),
            window=32,
            min_readings=4,
            features=SHELF_FEATURES,
            labels=["in_stock", "low", "empty"],
            normal_label="in_stock",
            threshold=0.5,
        ),
        hidden=(64, 64),
        steps=3000,
        # Low and stocked trays overlap in weight (capacity is per tray), so this one never stops
        # improving by tol: bigger batches and a faster rate get there in ~20 s on two cores.
        max_iter=100,
        batch_size=512,
        learning_rate=3e-3,
    ),
)


def _onnx_probabilities(
    model_bytes: bytes, manifest: Manifest, x: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    (out,) = session.run([manifest.output], {manifest.input: x})
    return np.asarray(out, dtype=np.float32)


def train_one(spec: Spec, out: Path) -> Result:
    """Train, check and write one model; the result says how well it does on held-out data."""
    started = time.perf_counter()
    m = spec.manifest
    heldout_steps = spec.steps // 2
    x, y = dataset(m, seed=TRAIN_SEED, steps=spec.steps, devices=DEVICES)
    xh, yh = dataset(m, seed=HELDOUT_SEED, steps=heldout_steps, devices=DEVICES)
    classes = np.arange(len(m.labels))
    for name, labels in (("training", y), ("held-out", yh)):
        missing = [m.labels[i] for i in classes if not np.any(labels == i)]
        if missing:
            raise RuntimeError(f"{m.ref}: the {name} set has no rows labelled {missing}")

    scaler = StandardScaler().fit(x)
    clf = MLPClassifier(
        hidden_layer_sizes=spec.hidden,
        activation="relu",
        solver="adam",
        max_iter=spec.max_iter,
        batch_size=spec.batch_size,
        learning_rate_init=spec.learning_rate,
        random_state=RANDOM_STATE,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x), y)
    if clf.out_activation_ != "softmax" or not np.array_equal(clf.classes_, classes):
        raise RuntimeError(f"{m.ref}: expected a softmax over classes {classes}, got {clf.out_activation_}")

    model = mlp_to_onnx(
        scaler.mean_,
        scaler.scale_,
        list(clf.coefs_),
        list(clf.intercepts_),
        input_name=m.input,
        output_name=m.output,
    )
    model_bytes = model.SerializeToString()
    expected = clf.predict_proba(scaler.transform(xh))
    got = _onnx_probabilities(model_bytes, m, xh)
    worst = float(np.max(np.abs(got - expected)))
    if worst > PARITY_ATOL:
        raise RuntimeError(f"{m.ref}: ONNX probabilities differ from scikit-learn's by {worst:.2e}")

    predicted = np.argmax(got, axis=1)
    accuracy = float(np.mean(predicted == yh))
    majority = float(np.max(np.bincount(yh, minlength=len(m.labels))) / len(yh))
    recall = {label: float(np.mean(predicted[yh == i] == i)) for i, label in enumerate(m.labels)}

    folder = out / m.name / m.version
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / m.file
    path.write_bytes(model_bytes)
    trained_on = (
        f"Simulator retail fleet of {DEVICES} devices, anomaly rate {DEFAULT_ANOMALY_RATE} per step "
        f"(outpost.services.inference.training.datasets). Trained on seed {TRAIN_SEED}, {spec.steps} steps, "
        f"{len(y)} rows; held out seed {HELDOUT_SEED}, {heldout_steps} steps, {len(yh)} rows: "
        f"accuracy {accuracy:.4f} (majority class {majority:.4f}). StandardScaler + MLP hidden "
        f"{list(spec.hidden)}, relu, adam (batch {spec.batch_size}, rate {spec.learning_rate}), "
        f"random_state {RANDOM_STATE}, {clf.n_iter_} epochs."
    )
    write_manifest(folder, m.model_copy(update={"sha256": sha256_of(path), "trained_on": trained_on}))
    return Result(
        ref=m.ref,
        hidden=spec.hidden,
        train_rows=len(y),
        heldout_rows=len(yh),
        accuracy=accuracy,
        majority=majority,
        recall=recall,
        epochs=int(clf.n_iter_),
        size=len(model_bytes),
        seconds=time.perf_counter() - started,
        path=path,
    )


def _table(results: Sequence[Result]) -> str:
    head = f"{'model':<22} {'hidden':<9} {'train':>7} {'held-out':>8} {'accuracy':>8} {'majority':>8} "
    head += f"{'epochs':>6} {'bytes':>7} {'s':>5}  recall per label"
    lines = [head, "-" * len(head)]
    for r in results:
        recall = ", ".join(f"{k} {v:.3f}" for k, v in r.recall.items())
        hidden = "x".join(map(str, r.hidden))
        lines.append(
            f"{r.ref:<22} {hidden:<9} {r.train_rows:>7} {r.heldout_rows:>8} {r.accuracy:>8.4f} "
            f"{r.majority:>8.4f} {r.epochs:>6} {r.size:>7} {r.seconds:>5.1f}  {recall}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"models folder (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--only", action="append", default=None, metavar="NAME@VERSION", help="train just these (repeatable)"
    )
    args = parser.parse_args(argv)
    specs = [s for s in SPECS if args.only is None or s.manifest.ref in args.only]
    if not specs:
        parser.error(f"--only matches none of {', '.join(s.manifest.ref for s in SPECS)}")
    results: list[Result] = []
    for spec in specs:
        print(f"training {spec.manifest.ref} ...", file=sys.stderr, flush=True)
        results.append(train_one(spec, args.out))
    print(_table(results))
    for r in results:
        print(f"wrote {r.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
