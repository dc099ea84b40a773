"""One factory for every backend: the config's ``type`` says which; ``auto`` picks the best that
can run here (TensorRT, then ONNX Runtime on CUDA, then on the CPU) and says why in the log."""

from __future__ import annotations

from pathlib import Path

from outpost.log import get_logger
from outpost.services.inference.backends.base import Backend, BackendUnavailable
from outpost.services.inference.backends.config import AutoConfig, BackendConfig, OrtConfig, TensorRTConfig
from outpost.services.inference.backends.onnx_runtime import OrtBackend, available_providers

log = get_logger("outpost.inference.backends")


def tensorrt_unavailable() -> str | None:
    """Why native TensorRT cannot run here, or None when it can."""
    from outpost.services.inference.backends import tensorrt

    return tensorrt.unavailable_reason()


def build_backend(cfg: BackendConfig, model_path: Path, *, model_sha256: str, engine_dir: Path) -> Backend:
    """Load ``model_path`` on the configured backend; BackendUnavailable or ModelLoadError if not."""
    if isinstance(cfg, OrtConfig):
        return OrtBackend(model_path, cfg, cache_dir=engine_dir / "ort-trt")
    if isinstance(cfg, TensorRTConfig):
        from outpost.services.inference.backends.tensorrt import TensorRTBackend

        why = tensorrt_unavailable()
        if why is not None:
            raise BackendUnavailable(f"tensorrt backend: {why}")
        return TensorRTBackend(
            model_path, cfg, model_sha256=model_sha256, cache_dir=cfg.engine_cache_dir or engine_dir
        )
    return _auto(cfg, model_path, model_sha256=model_sha256, engine_dir=engine_dir)


def _auto(cfg: AutoConfig, model_path: Path, *, model_sha256: str, engine_dir: Path) -> Backend:
    why_not_trt = tensorrt_unavailable()
    if why_not_trt is None:
        from outpost.services.inference.backends.tensorrt import TensorRTBackend

        trt_cfg = TensorRTConfig(
            fp16=cfg.fp16,
            max_batch=cfg.max_batch,
            intra_op_threads=cfg.intra_op_threads,
            engine_cache_dir=cfg.engine_cache_dir,
        )
        try:
            backend: Backend = TensorRTBackend(
                model_path, trt_cfg, model_sha256=model_sha256, cache_dir=cfg.engine_cache_dir or engine_dir
            )
        except BackendUnavailable as exc:
            why_not_trt = str(exc)
        else:
            log.info("auto backend: tensorrt", extra={"model": model_path.parent.name})
            return backend
    providers = available_providers()
    if "cuda" in providers:
        log.info(
            "auto backend: onnxruntime cuda",
            extra={"why_not_tensorrt": why_not_trt, "model": str(model_path)},
        )
        return OrtBackend(
            model_path, OrtConfig(providers=["cuda", "cpu"], intra_op_threads=cfg.intra_op_threads)
        )
    log.info(
        "auto backend: onnxruntime cpu",
        extra={"why_not_tensorrt": why_not_trt, "why_not_cuda": f"onnxruntime providers are {providers}"},
    )
    return OrtBackend(model_path, OrtConfig(providers=["cpu"], intra_op_threads=cfg.intra_op_threads))
