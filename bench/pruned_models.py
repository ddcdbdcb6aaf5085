"""What the export and engine benchmarks share: pruned SmolLM2 models and their FLOP counts.

A pruned model comes from a ``pruning_config.json`` applied to the dense model (reordered first
when the config says the search reordered weights), exactly as ``prune.py`` builds it.
"""

from __future__ import annotations

import os

from models.decoder import CausalLM
from models.spec import ModelSpec
from multipruner_jax.prune import surgery
from multipruner_jax.storage import hf_io, pruning_config


def run_name(file: str) -> str:
    """``tests/data/smollm2_demo_pruning_config.json`` -> ``smollm2_demo``;
    ``out/mp20/pruning_config.json`` -> ``mp20``."""
    name = os.path.splitext(os.path.basename(file))[0].removesuffix("_pruning_config")
    if name == "pruning_config":
        name = os.path.basename(os.path.dirname(os.path.abspath(file)))
    return name


def from_config(dense_dir: str, file: str) -> tuple[CausalLM, dict]:
    """The dense model of ``dense_dir`` cut by the pruning config ``file``, and the config."""
    config = pruning_config.load(file)
    model = hf_io.load_model(dense_dir)
    if config.get("weight_reorder"):
        surgery.reorder(model)
    return surgery.shrink(model, pruning_config.to_spec(model.spec, config)), config


def flops(spec: ModelSpec, keys: float) -> dict[str, float]:
    """Matmul FLOPs per token, by part, when each query sees ``keys`` keys: weights (the LM head
    included, the embedding lookup not) and attention scores and values (2 x 2 FLOPs per query
    channel and key)."""
    d = spec.hidden_size
    parts = dict.fromkeys(("LM head", "attention weights", "attention scores", "MLP"), 0.0)
    parts["LM head"] = 2.0 * spec.vocab_size * d
    for layer in spec.layers:
        if layer.has_attn:
            q = layer.kv_groups * spec.q_per_kv * spec.head_dim
            parts["attention weights"] += 2.0 * d * (2 * q + 2 * layer.kv_groups * spec.head_dim)
            parts["attention scores"] += 4.0 * q * keys
        if layer.has_mlp:
            parts["MLP"] += 6.0 * d * layer.mlp_width
    return parts
