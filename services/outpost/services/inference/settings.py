"""The inference service's settings section, ``inference:`` in the site file
(``OUTPOST_INFERENCE__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from outpost.services.inference.backends.config import AutoConfig, BackendConfig
from outpost.settings import Section
from outpost.topics import SEGMENT_RE


class InferenceSettings(Section):
    """The inference service (docs/inference.md): which models, on which backend, batched how."""

    models_dir: Path | None = Field(
        None, description="Folder of {name}/{version}/ model folders; default: the models Outpost ships."
    )
    models: list[str] = Field(
        default_factory=list, description="Model names to serve; empty = every model in models_dir."
    )
    backend: BackendConfig = Field(
        default_factory=AutoConfig, description="onnxruntime, tensorrt, or auto (the best that runs here)."
    )
    max_batch: int = Field(
        256, ge=1, le=4096, description="Most requests in one session call (batches fill only under load)."
    )
    max_wait_ms: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Longest a request waits for its batch to fill (Triton's max_queue_delay).",
    )
    qos: Literal[0, 1] = Field(1, description="QoS of the events subscription and score publishes.")
    reload_s: float = Field(0.5, gt=0, description="How often the registry state is checked for changes.")
    max_devices: int = Field(100_000, ge=1, description="Devices whose windows are kept (oldest forgotten).")
    checkpoint_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How often changed windows are checkpointed to SQLite (restart resumes).",
    )

    @field_validator("qos", mode="before")
    @classmethod
    def _qos_from_text(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() in ("0", "1"):
            return int(v)
        return v

    @field_validator("models")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if SEGMENT_RE.fullmatch(name) is None:
                raise ValueError(f"model name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        return v
