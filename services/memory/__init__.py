"""Memory: the append-only operational log (this release); short-term context, long-term vector
memory and checkpoints build on it (issue 4)."""
