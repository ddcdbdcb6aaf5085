"""Any model input the scripts accept, resolved and loaded: our checkpoints, prune output
folders, HF directories (dense or compact exports) and Hub ids.

Design: ``model_source`` says where an HF model lives (a local folder or a Hub snapshot); this
module adds our own checkpoint format on top and hands back a ``CausalLM`` and its tokenizer.
Evaluation, zero-shot scoring and LoRA recovery all load through it, so none of them imports
another for its loader, and it imports nothing above the I/O modules.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from models.decoder import CausalLM
from multipruner_jax.base.mesh import ShardingFor
from multipruner_jax.storage import checkpoint, hf_io, model_source

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model(path: str, weights: bool = True) -> str:
    """The local folder of a model: one of our checkpoints (also a prune output folder, whose
    ``checkpoint/`` it is; an incomplete one is refused), a local HF directory, or a Hub
    snapshot (config and tokenizer only unless ``weights``)."""
    path = checkpoint.locate(path)
    if checkpoint.is_checkpoint(path):
        checkpoint.load_spec(path)
        return path
    return model_source.resolve(path, weights=weights)


def load_tokenizer(path: str):
    """The tokenizer of an HF directory or of a checkpoint (saved in its ``tokenizer/``),
    refused when it has more tokens than the model's embedding has rows."""
    from transformers import AutoTokenizer

    model_path = path
    if checkpoint.is_checkpoint(path):
        spec = checkpoint.load_spec(path)
        path = os.path.join(path, checkpoint.TOKENIZER_DIR)
    else:
        spec = hf_io.read_spec(path)
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); expected the "
            "model's tokenizer files beside its config"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer):,} tokens but the model in {model_path} "
            f"has vocab_size {spec.vocab_size:,}; expected the model's own tokenizer (ids past "
            f"{spec.vocab_size - 1:,} have no embedding row)"
        )
    return tokenizer


def load_model(
    path: str, dtype: jnp.dtype = jnp.float32, sharding_for: ShardingFor | None = None
) -> CausalLM:
    """A model from an HF directory (dense, or a compact export) or one of our checkpoints."""
    if checkpoint.is_checkpoint(path):
        return checkpoint.restore(path, dtype, sharding_for)
    return hf_io.load_model(path, dtype, sharding_for)
