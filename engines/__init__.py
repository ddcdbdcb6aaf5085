"""Serving-engine runners (llama.cpp, mlx-lm, vLLM), each run in its own venv by `harness`."""
