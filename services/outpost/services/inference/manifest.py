"""A model's manifest: what the model is, which file holds it, what it reads and what it means.

Each model version lives in its own folder, ``{models_dir}/{name}/{version}/``, with a
``manifest.yaml`` beside the ONNX file. The manifest is the contract between the registry, the
feature windows and whoever reads the scores: nothing about a model is hard-coded in the service.

Example (``services/outpost/services/inference/models/shelf-stock/1.0.0/manifest.yaml``)::

    name: shelf-stock
    version: 1.0.0
    file: model.onnx
    sha256: 3f2a...
    description: Stock level of a shelf tray from its load cell.
    trigger: {metric: shelf_weight, device: "shelf-*"}
    window: 32
    min_readings: 4
    features:
      - {metric: shelf_weight, stat: last}
      - {metric: shelf_weight, stat: mean}
    input: features
    output: probabilities
    labels: [in_stock, low, empty]
    normal_label: in_stock
    threshold: 0.5

The score of an event is ``1 - P(normal_label)``: how far from normal the model thinks the device
is. ``alert`` is ``score >= threshold``; ``label`` is the most likely label, ``confidence`` its
probability.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from outpost.services.inference.backends.base import ModelLoadError

MANIFEST_FILE = "manifest.yaml"
MAX_MANIFEST_BYTES = 256 * 1024
"""A manifest is a page of YAML; anything bigger (or an alias bomb) is refused before parsing."""

Stat = Literal["last", "mean", "std", "min", "max", "range", "delta", "count"]
"""Window statistics a feature can take: ``delta`` is last minus first, ``range`` max minus min,
``count`` how many readings the window holds."""

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([A-Za-z0-9]+))?$")
Version = Annotated[str, StringConstraints(pattern=VERSION_RE.pattern)]


def version_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key in semver order: a pre-release (``1.0.0-int8``) sorts before its release."""
    m = VERSION_RE.fullmatch(version)
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trigger(_Strict):
    """Which events get a score: those of ``metric`` from devices whose id matches ``device``."""

    metric: Name = Field(description="The event metric that asks for a score.")
    device: str = Field("*", max_length=64, description="fnmatch pattern over device ids, e.g. fridge-*.")

    def matches(self, device: str, metric: str) -> bool:
        return metric == self.metric and fnmatch.fnmatchcase(device, self.device)


class Feature(_Strict):
    metric: Name = Field(description="Which of the device's metrics the window is over.")
    stat: Stat = Field(description="The statistic of that window.")


class Manifest(_Strict):
    name: Name = Field(description="Model name; the {model} level of inference topics.")
    version: Version = Field(description="Semantic version, e.g. 1.2.0 or 1.2.0-int8.")
    file: str = Field(
        "model.onnx", pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="ONNX file in the folder."
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Checksum of the file, checked at load.")
    description: str = Field("", max_length=2000)
    trigger: Trigger
    window: int = Field(32, ge=1, le=4096, description="Readings kept per (device, metric).")
    min_readings: int = Field(1, ge=1, description="Readings each feature's window needs before scoring.")
    features: list[Feature] = Field(min_length=1, max_length=1024)
    input: str = Field("features", description="Name of the model's float32 input of shape (N, features).")
    output: str = Field("probabilities", description="Name of the (N, labels) probability output.")
    labels: list[Name] = Field(min_length=2, description="What each output column means.")
    normal_label: Name = Field(description="The label that means all is well; score = 1 - P(it).")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="alert = score >= threshold.")
    trained_on: str = Field("", max_length=2000, description="How the model was made (data, seed).")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.normal_label not in self.labels:
            raise ValueError(f"normal_label {self.normal_label!r} is not one of labels {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.min_readings > self.window:
            raise ValueError(f"min_readings {self.min_readings} exceeds window {self.window}")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @cached_property
    def metrics(self) -> tuple[str, ...]:
        """The metrics whose windows the features read, each once, in first-use order."""
        return tuple(dict.fromkeys(f.metric for f in self.features))

    @cached_property
    def normal_index(self) -> int:
        return self.labels.index(self.normal_label)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> Manifest:
    """Parse and check ``folder/manifest.yaml`` (not the model file: see :func:`verify`)."""
    path = folder / MANIFEST_FILE
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelLoadError(f"{path}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no manifest") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"{path}: cannot read manifest: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: manifest must be a mapping")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors())
        raise ModelLoadError(f"{path}: invalid manifest: {problems}") from None
    if folder.name != manifest.version or folder.parent.name != manifest.name:
        raise ModelLoadError(
            f"{path}: manifest says {manifest.ref} but the folder is {folder.parent.name}/{folder.name}"
        )
    return manifest


def verify(folder: Path, manifest: Manifest) -> Path:
    """The model file's path, once its checksum matches the manifest; ModelLoadError otherwise."""
    path = folder / manifest.file
    if not path.is_file():
        raise ModelLoadError(f"{manifest.ref}: model file {path} is missing")
    actual = sha256_of(path)
    if actual != manifest.sha256:
        raise ModelLoadError(
            f"{manifest.ref}: checksum mismatch for {path.name} (manifest {manifest.sha256[:12]}..., "
            f"file {actual[:12]}...): the file is corrupt or was replaced"
        )
    return path


def write_manifest(folder: Path, manifest: Manifest) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = manifest.model_dump(mode="json")
    (folder / MANIFEST_FILE).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
