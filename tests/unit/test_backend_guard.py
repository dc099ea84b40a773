"""The TensorRT backend on a machine that cannot run it: the module imports without tensorrt or
pycuda, says why it cannot run, refuses an explicit ``tensorrt`` config with that reason, and
``auto`` falls back to ONNX Runtime on the CPU. The reasons for each missing piece are checked with
stand-in modules, so those tests run on any machine."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from outpost.services.inference.backends import tensorrt as trt_backend
from outpost.services.inference.backends.base import BackendUnavailable
from outpost.services.inference.backends.config import AutoConfig, TensorRTConfig
from outpost.services.inference.backends.factory import build_backend
from outpost.services.inference.backends.onnx_runtime import available_providers

FEATURES = 4
CLASSES = 3
RNG = np.random.default_rng(7)
W = RNG.normal(size=(FEATURES, CLASSES)).astype(np.float32)
B = RNG.normal(size=(CLASSES,)).astype(np.float32)


def _reference(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    logits = x @ W + B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    """features float32 [N, 4] -> MatMul -> Add -> Softmax -> probabilities float32 [N, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "guard",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(W, name="W"), numpy_helper.from_array(B, name="B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def no_tensorrt() -> str:
    """The reason TensorRT cannot run here; the test is skipped on a machine where it can."""
    why = trt_backend.unavailable_reason()
    if why is None:
        pytest.skip("TensorRT can run on this machine: tests/gpu covers it")
    return why


def test_module_imports_without_loading_tensorrt_or_pycuda() -> None:
    code = (
        "import sys; import outpost.services.inference.backends.tensorrt as m; "
        "print(hasattr(m, 'TensorRTBackend'), 'tensorrt' in sys.modules, 'pycuda' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "False", "False"]


def test_reason_is_a_cached_non_empty_string(no_tensorrt: str) -> None:
    assert isinstance(no_tensorrt, str)
    assert no_tensorrt.strip()
    assert trt_backend.unavailable_reason() is no_tensorrt


def test_explicit_tensorrt_config_raises_backend_unavailable(
    no_tensorrt: str, small_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(BackendUnavailable) as err:
        build_backend(TensorRTConfig(), small_model, model_sha256="0" * 64, engine_dir=tmp_path / "engines")
    assert no_tensorrt in str(err.value)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        trt_backend.TensorRTBackend(small_model, TensorRTConfig(), model_sha256="0" * 64, cache_dir=tmp_path)


def test_auto_falls_back_to_onnxruntime_cpu(no_tensorrt: str, small_model: Path, tmp_path: Path) -> None:
    if "cuda" in available_providers():
        pytest.skip("onnxruntime here has the CUDA provider, so auto picks onnxruntime-cuda")
    backend = build_backend(AutoConfig(), small_model, model_sha256="0" * 64, engine_dir=tmp_path / "engines")
    try:
        assert backend.name == "onnxruntime-cpu"
        x = RNG.normal(size=(5, FEATURES)).astype(np.float32)
        out = backend.run(x)["probabilities"]
        assert out.shape == (5, CLASSES)
        np.testing.assert_allclose(out, _reference(x), atol=1e-5)
    finally:
        backend.close()


# -- each reason, with stand-in modules (unavailable_reason.__wrapped__ skips the cache) ----------


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _fake_pycuda(monkeypatch: pytest.MonkeyPatch, *, init: Callable[[], None], count: int) -> None:
    class Device:
        @staticmethod
        def count() -> int:
            return count

    driver = _module("pycuda.driver", init=init, Device=Device)
    monkeypatch.setitem(sys.modules, "pycuda", _module("pycuda", driver=driver))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def _reason() -> str | None:
    result: str | None = trt_backend.unavailable_reason.__wrapped__()
    return result


def test_reason_when_tensorrt_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    why = _reason()
    assert why is not None
    assert "tensorrt package is not installed" in why


def test_reason_when_tensorrt_is_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _module("tensorrt", __version__="8.6.1"))
    why = _reason()
    assert why is not None
    assert "8.6.1" in why


def test_reason_when_pycuda_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _module("tensorrt", __version__="10.16.1.11"))
    monkeypatch.setitem(sys.modules, "pycuda", None)
    why = _reason()
    assert why is not None
    assert "pycuda package is not installed" in why


def test_reason_when_the_driver_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def init() -> None:
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "tensorrt", _module("tensorrt", __version__="10.16.1.11"))
    _fake_pycuda(monkeypatch, init=init, count=1)
    why = _reason()
    assert why is not None
    assert "no CUDA-capable device" in why


def test_reason_when_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _module("tensorrt", __version__="10.16.1.11"))
    _fake_pycuda(monkeypatch, init=lambda: None, count=0)
    assert _reason() == "the CUDA driver reports no GPU"


def test_no_reason_when_everything_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _module("tensorrt", __version__="10.16.1.11"))
    _fake_pycuda(monkeypatch, init=lambda: None, count=1)
    assert _reason() is None


def test_engine_file_is_keyed_by_everything_that_invalidates_an_engine(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "model_sha256": "ab" * 32,
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "trt_version": "10.16.1.11",
        "fp16": True,
        "max_batch": 256,
    }
    first = trt_backend.engine_file(tmp_path, **base)
    assert first.parent == tmp_path
    assert first.name.startswith("abababababababab-fp16-b256-")
    assert first == trt_backend.engine_file(tmp_path, **base)
    changes: list[tuple[str, Any]] = [
        ("model_sha256", "cd" * 32),
        ("gpu_name", "NVIDIA H200"),
        ("compute_capability", (8, 9)),
        ("trt_version", "10.15.1.29"),
        ("fp16", False),
        ("max_batch", 64),
    ]
    names = {first.name}
    for key, value in changes:
        names.add(trt_backend.engine_file(tmp_path, **{**base, key: value}).name)
    assert len(names) == len(changes) + 1
    odd = trt_backend.engine_file(tmp_path, **{**base, "model_sha256": "../../etc/passwd"})
    assert odd.parent == tmp_path
