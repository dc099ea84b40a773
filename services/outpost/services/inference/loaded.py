"""A model version ready to score: its manifest, its backend, checked and warmed up at load."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from outpost.services.inference.backends.base import Backend, FloatArray, ModelLoadError
from outpost.services.inference.backends.config import BackendConfig, OrtConfig
from outpost.services.inference.backends.factory import build_backend
from outpost.services.inference.manifest import Manifest
from outpost.services.inference.registry import Registry


@dataclass(eq=False)
class LoadedModel:
    manifest: Manifest
    backend: Backend
    load_ms: float

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def probabilities(self, x: FloatArray) -> FloatArray:
        out = self.backend.run(x).get(self.manifest.output)
        if out is None:
            raise ModelLoadError(f"{self.ref}: the model has no output {self.manifest.output!r}")
        return out

    def close(self) -> None:
        self.backend.close()


def build_and_warm(
    manifest: Manifest, path: Path, backend: BackendConfig, *, engine_dir: Path, max_batch: int
) -> LoadedModel:
    """Build the backend for a checked file and run a warm-up batch of 1 and of ``max_batch`` rows
    that also checks the model's shapes against the manifest. ModelLoadError or BackendUnavailable
    when any of it fails, so a bad version never reaches the scoring path."""
    t0 = time.perf_counter()
    b = build_backend(backend, path, model_sha256=manifest.sha256, engine_dir=engine_dir)
    lm = LoadedModel(manifest, b, 0.0)
    width, labels = len(manifest.features), len(manifest.labels)
    try:
        for rows in (1, max_batch):
            try:
                out = lm.probabilities(np.zeros((rows, width), dtype=np.float32))
            except ModelLoadError:
                raise
            except Exception as exc:  # noqa: BLE001 (a runtime error for a graph that does not fit)
                raise ModelLoadError(
                    f"{manifest.ref}: warm-up with {rows} x {width} features failed: {exc}"
                ) from None
            if out.shape != (rows, labels):
                raise ModelLoadError(
                    f"{manifest.ref}: output {manifest.output!r} has shape {out.shape}, the manifest "
                    f"promises ({rows}, {labels}) for labels {manifest.labels}"
                )
            if not np.all(np.isfinite(out)):
                raise ModelLoadError(f"{manifest.ref}: warm-up produced non-finite outputs")
    except BaseException:
        b.close()
        raise
    lm.load_ms = (time.perf_counter() - t0) * 1000.0
    return lm


def check_loads(manifest: Manifest, path: Path) -> None:
    """What ``outpost model activate`` runs before it writes the state: the file loads on ONNX
    Runtime (CPU) and its warm-up fits the manifest. ModelLoadError otherwise."""
    build_and_warm(manifest, path, OrtConfig(), engine_dir=Path("/nonexistent"), max_batch=32).close()


def load_model(
    registry: Registry, name: str, version: str, backend: BackendConfig, *, engine_dir: Path, max_batch: int
) -> LoadedModel:
    """Verify the file against its manifest, then :func:`build_and_warm`."""
    manifest, path = registry.verify(name, version)
    return build_and_warm(manifest, path, backend, engine_dir=engine_dir, max_batch=max_batch)
