"""Text embeddings on the device: a sentence-transformers BERT as an ONNX graph built from its
safetensors (:mod:`.graph`), tokenised and run by :mod:`.embedder` (docs/memory.md)."""
