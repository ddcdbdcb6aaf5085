"""The tiny model families every test uses, and the one builder of random HF torch models.

``FAMILIES`` holds HF ``config.json`` overrides per family on top of ``BASE``; ``spec`` parses them
with our own config reader, ``model`` builds a random JAX model from the spec, ``hf_model`` a
random transformers model from the same config (torch is imported only there).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.spec import ModelSpec, spec_from_hf_config

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": dict(  # GQA, llama3 rope scaling, tied embeddings
        model_type="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        rope_parameters=LLAMA3_ROPE,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(  # q/k/v biases, tied embeddings
        model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen3": dict(  # q/k norms, head_dim != hidden / heads
        model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
}


def config(family: str, **overrides: Any) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``family`` (with ``overrides``)."""
    return {**BASE, **FAMILIES[family], **overrides}


def spec(family: str, **overrides: Any) -> ModelSpec:
    return spec_from_hf_config(config(family, **overrides))


def model(family: str, seed: int = 0, **overrides: Any) -> CausalLM:
    """A random model whose norms and biases are non-trivial too (a fresh copy per call: a test
    may change its parameters in place); ``overrides`` change its HF config."""
    graphdef, state = _built(family, seed, json.dumps(overrides, sort_keys=True))
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


@functools.cache
def _built(family: str, seed: int, overrides: str = "{}"):
    m = decoder.build(spec(family, **json.loads(overrides)), seed=seed)
    rng = np.random.default_rng(seed)
    for layer in m.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight[...] = 1.0 + 0.2 * rng.standard_normal(norm.weight[...].shape, np.float32)
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            if proj.bias is not None:
                proj.bias[...] = 0.1 * rng.standard_normal(proj.bias[...].shape, np.float32)
    return nnx.split(m)


def tokens(rows: int, seq: int, vocab: int = BASE["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq)).astype(np.int32)


def hf_model(family: str, seed: int = 0, **overrides: Any):
    """A random fp32 transformers causal LM of ``family`` (bos id 0, eos id 1) in eval mode.

    Every parameter is re-drawn (biases non-zero, norm weights ``1 + 0.2 N(0, 1)``, the rest
    ``0.15 N(0, 1)``) so that each tensor, transposed or not, visibly affects the logits.
    """
    import torch
    import transformers

    cfg = config(family, **overrides)
    model_type = cfg.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=1, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.15 * noise)
    return model


def save_hf_model(path: str, family: str, seed: int = 0, **overrides: Any) -> str:
    """``hf_model(family, seed, **overrides)`` saved with ``save_pretrained``; returns ``path``."""
    hf_model(family, seed, **overrides).save_pretrained(path)
    return str(path)


def tiny_tokenizer(path: str, corpus: list[str], vocab_size: int = 300):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it to ``path`` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def prune_options(model_dir: str, out, **changes: Any):
    """``PruneOptions`` of a fast search on the tiny model of ``tiny_model_dir`` (SOTU text)."""
    from multipruner_jax.prune import pipeline
    from multipruner_jax.storage import assets

    base = dict(
        model_path=model_dir,
        output_path=str(out),
        weight_reorder=True,
        target_ratio=30.0,
        pruning_distribution="44:52:4",
        mlp_channel_group_size=32,
        attn_channel_group_size=32,
        calibration_dataset=str(assets.sotu_dir()),
        num_calibration_samples_block=6,
        num_calibration_samples_width=3,
        seqlen=32,
        batch_size=2,
        mesh_shape="2,1",
        quiet=True,
        report=False,  # matplotlib costs ~2 s a run; tests/test_refine.py draws
    )
    return pipeline.PruneOptions(**{**base, **changes})


def prune_flags(opts) -> list[str]:
    """``PruneOptions`` as ``prune.py`` command-line flags."""
    flags = []
    for key, value in vars(opts).items():
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no{key}")
        elif value is not None:
            flags.append(f"--{key}={value}")
    return flags
