"""Evaluation: perplexity and zero-shot accuracy (lm-evaluation-harness) of a JAX model."""
