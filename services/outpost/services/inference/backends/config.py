"""Backend settings: one pydantic model per backend, keyed by ``type``, joined into one union.

Set with ``inference: {backend: {type: onnxruntime, providers: [cpu]}}`` in outpost.yaml or
``OUTPOST_INFERENCE__BACKEND__TYPE=tensorrt``. No I/O here: whether a backend can run is decided by
:func:`outpost.services.inference.backends.build_backend` when a model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Provider = Literal["tensorrt", "cuda", "cpu"]


class _BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads one session call may use (1 is as fast and steadier for small models).",
    )


class OrtConfig(_BackendConfig):
    """ONNX Runtime with the given execution providers, in order of preference."""

    type: Literal["onnxruntime"] = Field("onnxruntime", description="Selects ONNX Runtime.")
    providers: list[Provider] = Field(
        default_factory=lambda: list[Provider](["cpu"]),
        min_length=1,
        description="Execution providers to use, best first; each must be available (no silent fallback).",
    )
    fp16: bool = Field(True, description="Let the TensorRT execution provider use FP16.")


class TensorRTConfig(_BackendConfig):
    """A native TensorRT engine built from the ONNX file, device buffers through pycuda."""

    type: Literal["tensorrt"] = Field("tensorrt", description="Selects native TensorRT.")
    fp16: bool = Field(True, description="Build FP16 kernels where the GPU supports them.")
    workspace_mb: int = Field(256, ge=16, description="Builder workspace limit.")
    max_batch: int = Field(256, ge=1, le=65536, description="Largest batch the engine's profile accepts.")
    engine_cache_dir: Path | None = Field(
        None, description="Where built engines are cached (default: {data_dir}/inference/engines)."
    )


class AutoConfig(_BackendConfig):
    """TensorRT if it can run here, then ONNX Runtime on CUDA, then ONNX Runtime on the CPU."""

    type: Literal["auto"] = Field("auto", description="Selects the best backend that runs here.")
    fp16: bool = Field(True, description="FP16 where TensorRT is chosen.")
    max_batch: int = Field(256, ge=1, le=65536, description="Largest batch a TensorRT engine accepts.")
    engine_cache_dir: Path | None = Field(None, description="TensorRT engine cache (see tensorrt).")


BackendConfig = Annotated[OrtConfig | TensorRTConfig | AutoConfig, Field(discriminator="type")]
