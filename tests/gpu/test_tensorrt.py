"""The native TensorRT backend on a real GPU: engine build and cache, parity with ONNX Runtime on
the CPU, batch shapes (chunked past max_batch), use from other threads, and ``auto`` choosing it.

Every test is marked ``gpu`` and skipped, with :func:`unavailable_reason`'s words, where TensorRT
cannot run. The committed ``shelf-stock`` 1.0.0 model is used; if it is absent, a small MLP of the
same shape is built here.

Tolerances against onnxruntime CPU on 1,000 rows: FP32 (TF32 off) within 1e-4 absolute on every
output; FP16 within 2e-2 absolute on the probabilities and the same argmax on at least 99% of rows.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from outpost.services.inference.backends.config import AutoConfig, OrtConfig, TensorRTConfig
from outpost.services.inference.backends.factory import build_backend
from outpost.services.inference.backends.onnx_runtime import OrtBackend
from outpost.services.inference.backends.tensorrt import TensorRTBackend, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "services" / "outpost" / "services" / "inference" / "models"
COMMITTED_MODEL = MODELS / "shelf-stock" / "1.0.0" / "model.onnx"
ROWS = 1000
FP32_ATOL = 1e-4
FP16_ATOL = 2e-2
FP16_ARGMAX_AGREEMENT = 0.99
SAME_ENGINE_ATOL = 1e-3
"""One engine against itself (another load, another thread, other chunking): bit-equal in practice,
but TensorRT does not promise deterministic tactics, and a wrong row is off by far more."""

Array = npt.NDArray[np.float32]


@pytest.fixture(scope="module", autouse=True)
def _needs_tensorrt() -> None:
    """First of the module's fixtures: the engines below are never built where TensorRT is absent."""
    why = unavailable_reason()
    if why is not None:
        pytest.skip(f"TensorRT cannot run here: {why}")


def _fallback_model(path: Path) -> None:
    """Sub(mean) -> Div(scale) -> MatMul/Add/Relu -> MatMul/Add -> Softmax, 7 features, 3 classes."""
    rng = np.random.default_rng(3)
    n_in, hidden, n_out = 7, 16, 3
    arrays = {
        "scaler_mean": rng.normal(10, 3, n_in),
        "scaler_scale": rng.uniform(1, 5, n_in),
        "W0": rng.normal(0, 0.5, (n_in, hidden)),
        "B0": rng.normal(0, 0.1, hidden),
        "W1": rng.normal(0, 0.5, (hidden, n_out)),
        "B1": rng.normal(0, 0.1, n_out),
    }
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), name=k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Sub", ["features", "scaler_mean"], ["centered"]),
        helper.make_node("Div", ["centered", "scaler_scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "W0"], ["mm0"]),
        helper.make_node("Add", ["mm0", "B0"], ["pre0"]),
        helper.make_node("Relu", ["pre0"], ["h0"]),
        helper.make_node("MatMul", ["h0", "W1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "B1"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "fallback-mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(path, sha256) of the model under test."""
    path = COMMITTED_MODEL
    if not path.is_file():
        path = tmp_path_factory.mktemp("model") / "model.onnx"
        _fallback_model(path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def rows(model: tuple[Path, str]) -> Array:
    """1,000 rows around the model's own scaler statistics (plain normal ones if it has none)."""
    graph = onnx.load(str(model[0])).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    dims = graph.input[0].type.tensor_type.shape.dim
    features = int(dims[1].dim_value)
    mean = inits.get("scaler_mean", np.zeros(features)).reshape(-1)
    scale = inits.get("scaler_scale", np.ones(features)).reshape(-1)
    rng = np.random.default_rng(11)
    x = mean + scale * rng.normal(size=(ROWS, features))
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


def _trt(model: tuple[Path, str], engine_dir: Path, *, fp16: bool) -> Iterator[TensorRTBackend]:
    b = TensorRTBackend(model[0], TensorRTConfig(fp16=fp16), model_sha256=model[1], cache_dir=engine_dir)
    yield b
    b.close()


@pytest.fixture(scope="module")
def fp16_backend(model: tuple[Path, str], engine_dir: Path) -> Iterator[TensorRTBackend]:
    yield from _trt(model, engine_dir, fp16=True)


@pytest.fixture(scope="module")
def fp32_backend(model: tuple[Path, str], engine_dir: Path) -> Iterator[TensorRTBackend]:
    yield from _trt(model, engine_dir, fp16=False)


@pytest.fixture(scope="module")
def ort(model: tuple[Path, str]) -> Iterator[OrtBackend]:
    b = OrtBackend(model[0], OrtConfig(providers=["cpu"]))
    yield b
    b.close()


def _probabilities_name(names: list[str]) -> str:
    return "probabilities" if "probabilities" in names else names[0]


@pytest.mark.gpu
def test_engine_builds_from_the_onnx_file(fp16_backend: TensorRTBackend, engine_dir: Path) -> None:
    b = fp16_backend
    assert b.built is True
    assert b.name == ("tensorrt-fp16" if b.fp16 else "tensorrt-fp32")
    if b.trt_version.startswith("10."):
        assert b.fp16, "every GPU TensorRT 10 supports (sm_75 on) has fast FP16"
    assert b.engine_path.parent == engine_dir
    assert b.engine_path.is_file() and b.engine_path.stat().st_size > 0
    assert not list(engine_dir.glob(".*.tmp")), "temporary engine files left behind"
    assert b.max_batch == 256
    print(f"\n{b.name} on {b.gpu_name}, TensorRT {b.trt_version}: {b.engine_path.name}")


@pytest.mark.gpu
def test_second_load_uses_the_cached_engine(
    model: tuple[Path, str], fp16_backend: TensorRTBackend, rows: Array
) -> None:
    again = TensorRTBackend(
        model[0], TensorRTConfig(fp16=True), model_sha256=model[1], cache_dir=fp16_backend.engine_path.parent
    )
    try:
        assert again.built is False
        assert again.engine_path == fp16_backend.engine_path
        assert again.name == fp16_backend.name
        first, second = fp16_backend.run(rows[:64]), again.run(rows[:64])
        for name in fp16_backend.output_names:
            np.testing.assert_allclose(second[name], first[name], atol=SAME_ENGINE_ATOL)
    finally:
        again.close()


@pytest.mark.gpu
def test_unusable_cache_file_is_rebuilt(model: tuple[Path, str], tmp_path: Path, rows: Array) -> None:
    cfg = TensorRTConfig(fp16=False, max_batch=8)
    first = TensorRTBackend(model[0], cfg, model_sha256=model[1], cache_dir=tmp_path)
    path = first.engine_path
    expected = first.run(rows[:8])
    first.close()
    path.write_bytes(b"this is not a TensorRT engine")

    rebuilt = TensorRTBackend(model[0], cfg, model_sha256=model[1], cache_dir=tmp_path)
    try:
        assert rebuilt.built is True
        got = rebuilt.run(rows[:8])
        for name in rebuilt.output_names:
            np.testing.assert_allclose(got[name], expected[name], atol=FP32_ATOL)
    finally:
        rebuilt.close()
    assert path.stat().st_size > 100
    cached = TensorRTBackend(model[0], cfg, model_sha256=model[1], cache_dir=tmp_path)
    try:
        assert cached.built is False
    finally:
        cached.close()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.gpu
def test_fp32_matches_onnxruntime_cpu(fp32_backend: TensorRTBackend, ort: OrtBackend, rows: Array) -> None:
    assert fp32_backend.name == "tensorrt-fp32"
    want, got = ort.run(rows), fp32_backend.run(rows)
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape
        worst = float(np.max(np.abs(got[name].astype(np.float64) - expected)))
        print(f"\nfp32 {name}: max abs diff {worst:.2e} over {ROWS} rows")
        np.testing.assert_allclose(got[name], expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.gpu
def test_fp16_matches_onnxruntime_cpu(fp16_backend: TensorRTBackend, ort: OrtBackend, rows: Array) -> None:
    want, got = ort.run(rows), fp16_backend.run(rows)
    name = _probabilities_name(fp16_backend.output_names)
    assert got[name].shape == want[name].shape == (ROWS, want[name].shape[1])
    worst = float(np.max(np.abs(got[name].astype(np.float64) - want[name])))
    agree = float(np.mean(np.argmax(got[name], axis=1) == np.argmax(want[name], axis=1)))
    print(f"\n{fp16_backend.name} {name}: max abs diff {worst:.2e}, argmax agreement {agree:.4f}")
    np.testing.assert_allclose(got[name], want[name], atol=FP16_ATOL, rtol=0)
    assert agree >= FP16_ARGMAX_AGREEMENT


@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 32, 256, 300])
def test_batch_sizes_give_correct_shapes(
    fp16_backend: TensorRTBackend, ort: OrtBackend, rows: Array, n: int
) -> None:
    """300 > max_batch (256): run in two chunks, 256 and 44, and joined."""
    got = fp16_backend.run(rows[:n])
    assert set(got) == set(fp16_backend.output_names)
    if n == 0:
        for arr in got.values():
            assert arr.shape[0] == 0
        return
    want = ort.run(rows[:n])
    for name, expected in want.items():
        assert got[name].shape == expected.shape
        assert got[name].shape[0] == n
        assert got[name].dtype == expected.dtype
        np.testing.assert_allclose(got[name], expected, atol=FP16_ATOL, rtol=0)


@pytest.mark.gpu
def test_chunked_batch_equals_its_parts(fp16_backend: TensorRTBackend, rows: Array) -> None:
    whole = fp16_backend.run(rows[:300])
    head, tail = fp16_backend.run(rows[:256]), fp16_backend.run(rows[256:300])
    for name in fp16_backend.output_names:
        np.testing.assert_allclose(
            whole[name], np.concatenate([head[name], tail[name]]), atol=SAME_ENGINE_ATOL
        )


@pytest.mark.gpu
def test_run_from_other_threads(fp16_backend: TensorRTBackend, rows: Array) -> None:
    batch = rows[:100]
    reference = fp16_backend.run(batch)
    with ThreadPoolExecutor(max_workers=1) as one:
        other = one.submit(fp16_backend.run, batch).result(timeout=60)
    for name in fp16_backend.output_names:
        np.testing.assert_allclose(other[name], reference[name], atol=SAME_ENGINE_ATOL)

    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for i in range(20):
                n = 1 + (i * 37) % 300
                out = fp16_backend.run(rows[:n])
                for name in fp16_backend.output_names:
                    assert out[name].shape[0] == n
                out = fp16_backend.run(batch)
                for name in fp16_backend.output_names:
                    np.testing.assert_allclose(out[name], reference[name], atol=SAME_ENGINE_ATOL)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the main thread below)
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


@pytest.mark.gpu
def test_loaded_on_one_thread_run_and_closed_on_others(
    model: tuple[Path, str], fp16_backend: TensorRTBackend, rows: Array
) -> None:
    """The service's pattern: load on its thread, score on a worker, close from wherever."""
    cache = fp16_backend.engine_path.parent
    with ThreadPoolExecutor(max_workers=1) as loader:
        b = loader.submit(
            TensorRTBackend, model[0], TensorRTConfig(fp16=True), model_sha256=model[1], cache_dir=cache
        ).result(timeout=300)
    try:
        got = b.run(rows[:50])
        want = fp16_backend.run(rows[:50])
        for name in b.output_names:
            np.testing.assert_allclose(got[name], want[name], atol=SAME_ENGINE_ATOL)
    finally:
        with ThreadPoolExecutor(max_workers=1) as closer:
            closer.submit(b.close).result(timeout=60)
    b.close()  # a second close is a no-op
    with pytest.raises(RuntimeError, match="closed"):
        b.run(rows[:1])


@pytest.mark.gpu
def test_factory_auto_picks_tensorrt(
    model: tuple[Path, str], fp16_backend: TensorRTBackend, rows: Array
) -> None:
    b = build_backend(
        AutoConfig(), model[0], model_sha256=model[1], engine_dir=fp16_backend.engine_path.parent
    )
    try:
        assert b.name.startswith("tensorrt"), b.name
        assert isinstance(b, TensorRTBackend)
        assert b.built is False  # same model, GPU, precision and max_batch as the fp16 fixture
        out = b.run(rows[:10])
        assert out[_probabilities_name(b.output_names)].shape[0] == 10
    finally:
        b.close()


@pytest.mark.gpu
def test_factory_tensorrt_config(model: tuple[Path, str], fp16_backend: TensorRTBackend) -> None:
    b = build_backend(
        TensorRTConfig(fp16=True), model[0], model_sha256=model[1], engine_dir=fp16_backend.engine_path.parent
    )
    try:
        assert isinstance(b, TensorRTBackend)
        assert b.name == fp16_backend.name
    finally:
        b.close()
