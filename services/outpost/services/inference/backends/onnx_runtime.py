"""ONNX Runtime: the backend every machine has (CPU), with CUDA and TensorRT execution providers
where the GPU build of onnxruntime is installed.

A provider that was asked for and is not available is an error, never a silent fallback to the
CPU: an operator who configured the GPU must learn that it is not used. ``auto`` is the way to say
"the best there is" (see :mod:`outpost.services.inference.backends.factory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from outpost.services.inference.backends.base import BackendUnavailable, FloatArray, ModelLoadError
from outpost.services.inference.backends.config import OrtConfig

_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def available_providers() -> list[str]:
    """The short names (tensorrt, cuda, cpu) this onnxruntime build can use."""
    have = set(ort.get_available_providers())
    return [short for short, full in _PROVIDERS.items() if full in have]


class OrtBackend:
    def __init__(self, model_path: Path, cfg: OrtConfig, *, cache_dir: Path | None = None) -> None:
        have = available_providers()
        missing = [p for p in cfg.providers if p not in have]
        if missing:
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} here has providers {have}, not {missing} "
                "(install onnxruntime-gpu on a GPU machine, or use backend type auto)"
            )
        providers: list[Any] = []
        for p in cfg.providers:
            if p == "tensorrt":
                opts: dict[str, Any] = {"trt_fp16_enable": cfg.fp16}
                if cache_dir is not None:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
                providers.append((_PROVIDERS[p], opts))
            else:
                providers.append(_PROVIDERS[p])
        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises untyped errors for bad graphs)
            raise ModelLoadError(f"onnxruntime cannot load {model_path}: {exc}") from None
        self.name = "onnxruntime-" + "+".join(cfg.providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x: FloatArray) -> dict[str, FloatArray]:
        name = next(iter(self.inputs))
        values = self.session.run(None, {name: x})
        return {n: np.asarray(v) for n, v in zip(self.outputs, values, strict=True)}

    def close(self) -> None:
        del self.session
