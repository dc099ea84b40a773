"""Memory: the append-only operational log (with its service), short-term context, checkpoints,
long-term vector memory with text embeddings, and the MQTT 5 request API (docs/memory.md)."""
