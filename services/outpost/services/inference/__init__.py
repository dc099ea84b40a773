"""Inference: local models (ONNX Runtime, TensorRT) scoring validated events (docs/inference.md)."""
