"""The compiled per-layer engine: a program per layer graph, the one cross-entropy, token rows."""
