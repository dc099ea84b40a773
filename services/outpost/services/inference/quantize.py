"""Dynamic INT8 quantization of a model version, and what it costs and saves.

``onnxruntime.quantization.quantize_dynamic`` stores MatMul weights as INT8 and quantizes
activations on the fly, so no calibration data is needed. Whether that is worth it is measured,
not assumed: file size, ORT-CPU latency per batch and accuracy against the float model on held-out
simulator data (a seed the training never saw). The result is a new version ``{version}-int8``
beside the float one, with its own manifest and checksum; as a pre-release it is never picked by
default, only by ``outpost model activate`` or ``shadow``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from outpost.services.inference.backends.base import ModelLoadError
from outpost.services.inference.manifest import Manifest, sha256_of, write_manifest
from outpost.services.inference.registry import Registry

HELD_OUT_SEED = 2
BATCHES = (1, 32, 256)
"""Batch sizes whose latency per call is measured, float and INT8."""
STEPS = 4 + 2 * len(BATCHES)
"""Steps :func:`quantize` announces to its ``progress`` (verify, quantize, held-out data, accuracy,
then each latency measurement): what a progress bar counts to."""


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    source: str
    result: str
    float_bytes: int
    int8_bytes: int
    float_us: dict[int, float]
    int8_us: dict[int, float]
    float_accuracy: float
    int8_accuracy: float
    agreement: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "result": self.result,
            "float_bytes": self.float_bytes,
            "int8_bytes": self.int8_bytes,
            "size_ratio": round(self.int8_bytes / self.float_bytes, 3),
            "float_us_per_batch": {str(b): us for b, us in self.float_us.items()},
            "int8_us_per_batch": {str(b): us for b, us in self.int8_us.items()},
            "float_accuracy": round(self.float_accuracy, 4),
            "int8_accuracy": round(self.int8_accuracy, 4),
            "accuracy_change": round(self.int8_accuracy - self.float_accuracy, 4),
            "label_agreement": round(self.agreement, 4),
            "held_out_rows": self.rows,
        }


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _latency_us(sess: ort.InferenceSession, m: Manifest, batch: int, repeats: int = 300) -> float:
    x = np.random.default_rng(0).standard_normal((batch, len(m.features))).astype(np.float32)
    feed = {m.input: x}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - t)
    return round(statistics.median(times) / 1000.0, 2)


def quantize(
    registry: Registry,
    name: str,
    version: str,
    *,
    held_out_steps: int = 1500,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> QuantizeReport:
    """``progress`` is told each of the :data:`STEPS` steps as it starts (the CLI shows a bar)."""
    progress(f"loading the quantizer, verifying {name}@{version}")  # the imports take seconds
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from outpost.services.inference.training.datasets import dataset

    manifest, src = registry.verify(name, version)
    if "-" in version:
        raise ModelLoadError(f"{name}@{version} is already a pre-release; quantize a release version")
    new_version = f"{version}-int8"
    dest = registry.folder(name, new_version)
    if dest.exists() and not overwrite:
        raise ModelLoadError(f"{name}@{new_version} exists already (use --overwrite to replace it)")
    progress(f"quantizing {manifest.ref} (dynamic INT8 weights)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / manifest.file
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # shape inference and graph clean-up first, as onnxruntime recommends before quantizing
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
        except Exception as exc:  # noqa: BLE001 (the quantizer raises untyped errors)
            raise ModelLoadError(f"{manifest.ref}: quantization failed: {exc}") from None
        q_manifest = manifest.model_copy(
            update={
                "version": new_version,
                "sha256": sha256_of(out),
                "description": (manifest.description + " Dynamic INT8 weights.").strip(),
                "trained_on": f"{manifest.trained_on} Quantized from {manifest.ref}.".strip(),
            }
        )
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        shutil.copyfile(out, dest / manifest.file)
        write_manifest(dest, q_manifest)
    f_sess, q_sess = _session(src), _session(dest / manifest.file)
    progress(f"held-out data: {held_out_steps:,} simulator steps (seed {HELD_OUT_SEED})")
    x, y = dataset(manifest, seed=HELD_OUT_SEED, steps=held_out_steps)
    progress(f"accuracy of float and INT8 on {len(y):,} held-out rows")
    f_pred = f_sess.run([manifest.output], {manifest.input: x})[0].argmax(axis=1)
    q_pred = q_sess.run([manifest.output], {manifest.input: x})[0].argmax(axis=1)
    q_accuracy = float(np.mean(q_pred == y))
    # the manifest says what this version measured, not only what its float source did
    write_manifest(
        dest,
        q_manifest.model_copy(
            update={
                "trained_on": f"{q_manifest.trained_on} INT8 held-out accuracy {q_accuracy:.4f} "
                f"on {len(y)} rows (seed {HELD_OUT_SEED})."
            }
        ),
    )
    latency: dict[str, dict[int, float]] = {"float": {}, "INT8": {}}
    for kind, sess in (("float", f_sess), ("INT8", q_sess)):
        for b in BATCHES:
            progress(f"latency of {kind}, batch {b}")
            latency[kind][b] = _latency_us(sess, manifest, b)
    return QuantizeReport(
        source=manifest.ref,
        result=q_manifest.ref,
        float_bytes=src.stat().st_size,
        int8_bytes=(dest / manifest.file).stat().st_size,
        float_us=latency["float"],
        int8_us=latency["INT8"],
        float_accuracy=float(np.mean(f_pred == y)),
        int8_accuracy=q_accuracy,
        agreement=float(np.mean(f_pred == q_pred)),
        rows=len(y),
    )
