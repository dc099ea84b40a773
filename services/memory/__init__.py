"""Memory: the append-only operational log (with its service), short-term context and checkpoints;
long-term vector memory, the MQTT API and sync are still to come (issue 4, docs/memory.md)."""
