"""The training tools and the committed models: simulator data sets, the hand-built ONNX graph,
and each model under services/outpost/services/inference/models (checksum, I/O contract, beats the
majority class)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from outpost.services.inference.manifest import MANIFEST_FILE, Manifest, read_manifest, verify
from outpost.services.inference.training.datasets import LABELERS, dataset
from outpost.services.inference.training.graph import mlp_to_onnx

MODELS = Path(__file__).resolve().parents[2] / "services" / "outpost" / "services" / "inference" / "models"
COMMITTED = ("fridge-anomaly@1.0.0", "fridge-anomaly@1.1.0", "shelf-stock@1.0.0")


def _folders() -> list[Path]:
    return sorted(p.parent for p in MODELS.glob(f"*/*/{MANIFEST_FILE}"))


def _manifest(ref: str) -> Manifest:
    name, version = ref.split("@")
    return read_manifest(MODELS / name / version)


def _session(path: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_the_committed_models_are_all_there() -> None:
    refs = {f"{f.parent.name}@{f.name}" for f in _folders()}
    assert set(COMMITTED) <= refs
    assert {r.split("@")[0] for r in refs} <= set(LABELERS)


@pytest.mark.parametrize("ref", ["fridge-anomaly@1.0.0", "shelf-stock@1.0.0"])
def test_dataset_is_deterministic_and_has_every_label(ref: str) -> None:
    manifest = _manifest(ref)
    x, y = dataset(manifest, seed=11, steps=800)
    x2, y2 = dataset(manifest, seed=11, steps=800)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (len(y), len(manifest.features)) and len(y) > 1000
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.all(np.isfinite(x))
    counts = np.bincount(y, minlength=len(manifest.labels))
    assert len(counts) == len(manifest.labels) and np.all(counts > 0), dict(
        zip(manifest.labels, counts, strict=True)
    )
    x3, _ = dataset(manifest, seed=12, steps=800)
    assert x3.shape != x.shape or not np.array_equal(x3, x)


def test_dataset_rejects_a_model_it_has_no_ground_truth_for() -> None:
    manifest = _manifest("shelf-stock@1.0.0").model_copy(update={"name": "mystery"})
    with pytest.raises(ValueError, match="no ground truth"):
        dataset(manifest, seed=1, steps=1)


def _forward(
    x: npt.NDArray[np.float64],
    mean: npt.NDArray[np.float64],
    scale: npt.NDArray[np.float64],
    weights: list[npt.NDArray[np.float64]],
    biases: list[npt.NDArray[np.float64]],
) -> npt.NDArray[np.float64]:
    h = (x - mean) / scale
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = h @ w + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("hidden", [(), (8,), (16, 8)])
def test_mlp_to_onnx_matches_a_numpy_forward_pass(hidden: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    sizes = [5, *hidden, 3]
    weights = [rng.normal(0.0, 0.5, (a, b)) for a, b in itertools.pairwise(sizes)]
    biases = [rng.normal(0.0, 0.1, b) for b in sizes[1:]]
    mean, scale = rng.normal(0.0, 2.0, 5), rng.uniform(0.5, 3.0, 5)
    model = mlp_to_onnx(mean, scale, weights, biases, input_name="x", output_name="p")
    assert {n.op_type for n in model.graph.node} <= {"Sub", "Div", "MatMul", "Add", "Relu", "Softmax"}
    assert [n.op_type for n in model.graph.node].count("MatMul") == len(weights)
    x = rng.normal(0.0, 3.0, (64, 5)).astype(np.float32)
    (got,) = _session(model.SerializeToString()).run(["p"], {"x": x})
    want = _forward(x.astype(np.float64), mean, scale, weights, biases)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (64, 3)
    # same arrays, same bytes
    again = mlp_to_onnx(mean, scale, weights, biases, input_name="x", output_name="p")
    assert again.SerializeToString() == model.SerializeToString()


def test_mlp_to_onnx_rejects_mismatched_layers() -> None:
    with pytest.raises(ValueError, match="layer 1"):
        mlp_to_onnx(np.zeros(3), np.ones(3), [np.zeros((3, 4)), np.zeros((5, 2))], [np.zeros(4), np.zeros(2)])


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("ref", COMMITTED)
def test_committed_model_matches_its_manifest(ref: str) -> None:
    name, version = ref.split("@")
    folder = MODELS / name / version
    manifest = read_manifest(folder)
    path = verify(folder, manifest)  # the checksum
    assert path.stat().st_size < 100_000
    model = onnx.load(path)
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == manifest.input and out.name == manifest.output
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == ["N", len(manifest.features)]
    assert _dims(out) == ["N", len(manifest.labels)]
    assert manifest.trained_on


@pytest.mark.parametrize("ref", COMMITTED)
def test_committed_model_beats_the_majority_class(ref: str) -> None:
    manifest = _manifest(ref)
    x, y = dataset(manifest, seed=3, steps=600)
    (p,) = _session(MODELS / manifest.name / manifest.version / manifest.file).run(
        [manifest.output], {manifest.input: x}
    )
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(p.argmax(axis=1) == y))
    majority = float(np.bincount(y).max() / len(y))
    assert accuracy > majority + 0.05, (accuracy, majority)
    assert accuracy > 0.85
