"""What the encoder's model folder says about it: its BERT config, and the error for a folder that
is missing, damaged or not a BERT the builder knows.

Apart from :mod:`.graph` (which imports ``onnx``, about a second and 30 MB) so that a memory
service reads and checks the folder at start and imports the builder only when it first builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from outpost.errors import OutpostError


class EmbeddingModelError(OutpostError):
    """The embedding model's files are missing, damaged or not a BERT this builder knows."""


@dataclass(frozen=True, slots=True)
class BertConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    eps: float
    max_positions: int

    @classmethod
    def read(cls, path: Path) -> BertConfig:
        try:
            c = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise EmbeddingModelError(f"{path}: cannot read the model config: {exc}") from exc
        if c.get("model_type") != "bert" or c.get("hidden_act") != "gelu":
            raise EmbeddingModelError(f"{path}: not a BERT with GELU (model_type {c.get('model_type')!r})")
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise EmbeddingModelError(f"{path}: only absolute position embeddings are supported")
        try:
            cfg = cls(
                hidden=int(c["hidden_size"]),
                layers=int(c["num_hidden_layers"]),
                heads=int(c["num_attention_heads"]),
                intermediate=int(c["intermediate_size"]),
                eps=float(c["layer_norm_eps"]),
                max_positions=int(c["max_position_embeddings"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingModelError(f"{path}: incomplete BERT config: {exc}") from exc
        if cfg.hidden % cfg.heads:
            raise EmbeddingModelError(
                f"{path}: hidden size {cfg.hidden} is not a multiple of {cfg.heads} heads"
            )
        return cfg
