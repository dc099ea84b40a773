"""Inference: local models (ONNX Runtime, TensorRT) scoring validated events. In progress (issue 3)."""
