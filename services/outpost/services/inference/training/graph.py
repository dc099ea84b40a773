"""A scaled multi-layer perceptron as a plain ONNX graph, built by hand from standard ops.

``Sub(mean) -> Div(scale) -> [MatMul -> Add -> Relu] * hidden -> MatMul -> Add -> Softmax``: the
graph a scikit-learn ``StandardScaler`` + ``MLPClassifier`` (relu, softmax output) computes. Each
layer is a MatMul and an Add, never a Gemm, because onnxruntime's dynamic INT8 quantization only
quantizes MatMul; TensorRT parses every op here. The serialized bytes depend only on the arrays
given (fixed producer fields, no timestamps, fixed IR version), so retraining the same data gives
the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

PRODUCER_NAME: Final = "outpost"
PRODUCER_VERSION: Final = "1"
IR_VERSION: Final = 8
"""IR 8 is the one that came with opset 17: old enough for every runtime that reads opset 17."""
BATCH_DIM: Final = "N"


def _f32(name: str, value: npt.ArrayLike) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype=np.float32)), name=name)


def _internal_names(layers: int) -> set[str]:
    names = {"scaler_mean", "scaler_scale", "centered", "scaled", "logits"}
    for i in range(layers):
        names |= {f"W{i}", f"B{i}", f"matmul{i}", f"pre{i}", f"hidden{i}"}
    return names


def mlp_to_onnx(
    scaler_mean: npt.ArrayLike,
    scaler_scale: npt.ArrayLike,
    weights: Sequence[npt.NDArray[np.floating]],
    biases: Sequence[npt.NDArray[np.floating]],
    *,
    input_name: str = "features",
    output_name: str = "probabilities",
    opset: int = 17,
) -> onnx.ModelProto:
    """The ONNX model of ``softmax(relu(...relu(((x - mean) / scale) @ W0 + b0)...) @ Wk + bk)``.

    ``weights[i]`` has shape (inputs, outputs) as in scikit-learn's ``coefs_``; ``biases[i]`` shape
    (outputs,). The input is float32 of shape (N, features), the output float32 (N, classes).
    """
    mean = np.asarray(scaler_mean, dtype=np.float32).reshape(-1)
    scale = np.asarray(scaler_scale, dtype=np.float32).reshape(-1)
    if len(weights) != len(biases) or not weights:
        raise ValueError(
            f"need one bias per weight matrix and at least one layer, got {len(weights)} and {len(biases)}"
        )
    n_features = int(mean.shape[0])
    if scale.shape != mean.shape:
        raise ValueError(f"scaler mean has {mean.shape[0]} values but scale has {scale.shape[0]}")
    if np.any(scale == 0.0) or not np.all(np.isfinite(scale)):
        raise ValueError("scaler scale must be finite and non-zero")
    width = n_features
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.ndim != 2 or w.shape[0] != width:
            raise ValueError(f"layer {i}: weights of shape {w.shape} do not take {width} inputs")
        if b.shape != (w.shape[1],):
            raise ValueError(f"layer {i}: bias of shape {b.shape} does not match {w.shape[1]} outputs")
        width = int(w.shape[1])
    n_classes = width
    if input_name == output_name or {input_name, output_name} & _internal_names(len(weights)):
        raise ValueError(
            f"input {input_name!r} and output {output_name!r} must differ from the graph's own names"
        )

    initializers = [_f32("scaler_mean", mean), _f32("scaler_scale", scale)]
    nodes = [
        helper.make_node("Sub", [input_name, "scaler_mean"], ["centered"], name="center"),
        helper.make_node("Div", ["centered", "scaler_scale"], ["scaled"], name="scale"),
    ]
    x = "scaled"
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        initializers += [_f32(f"W{i}", w), _f32(f"B{i}", b)]
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"matmul{i}"], name=f"matmul{i}"))
        out = "logits" if i == last else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"matmul{i}", f"B{i}"], [out], name=f"add{i}"))
        if i != last:
            nodes.append(helper.make_node("Relu", [out], [f"hidden{i}"], name=f"relu{i}"))
            x = f"hidden{i}"
    nodes.append(helper.make_node("Softmax", ["logits"], [output_name], name="softmax", axis=-1))

    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [BATCH_DIM, n_features])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [BATCH_DIM, n_classes])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model
