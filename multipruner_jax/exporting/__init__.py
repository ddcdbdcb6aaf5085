"""Exports for serving engines: the format table, HF tensors, DeciLM, GGUF, their remote code."""
