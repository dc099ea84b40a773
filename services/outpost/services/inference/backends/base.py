"""The one interface every inference backend implements.

A backend owns one loaded model and runs it on a batch: a float32 array of shape (rows, features)
in, the model's outputs by name out (each with ``rows`` as its first dimension). Everything else
(windows, batching, labels, thresholds) is the service's, so a backend stays small enough to be
checked against the others for parity.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from outpost.errors import OutpostError

FloatArray = npt.NDArray[np.float32]


class ModelLoadError(OutpostError):
    """A model file is missing, corrupt, or does not match its manifest."""


class BackendUnavailable(OutpostError):  # noqa: N818 (a state, not an event)
    """The backend cannot run on this machine (no GPU, runtime not installed)."""


class Backend(Protocol):
    name: str
    """What runs the model, e.g. ``onnxruntime-cpu``, ``onnxruntime-cuda``, ``tensorrt-fp16``."""

    def run(self, x: FloatArray) -> dict[str, FloatArray]:
        """Score a batch: ``x`` is C-contiguous float32 of shape (rows, features)."""
        ...

    def close(self) -> None:
        """Release sessions and device memory."""
        ...
