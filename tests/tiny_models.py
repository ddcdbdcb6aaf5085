"""Tiny model specs of every supported family (no torch), for surgery and search tests."""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.spec import ModelSpec, spec_from_hf_config

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4)
FAMILIES = {
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": dict(
        model_type="llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(
        model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


def spec(family: str) -> ModelSpec:
    return spec_from_hf_config({**BASE, **FAMILIES[family]})


def model(family: str, seed: int = 0) -> CausalLM:
    """A random model whose norms and biases are non-trivial too (a fresh copy per call)."""
    return nnx.merge(*_built(family, seed))


@functools.cache
def _built(family: str, seed: int):
    m = decoder.build(spec(family), seed=seed)
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


def save_hf_model(path: str, family: str, vocab_size: int, seed: int = 0, **overrides) -> None:
    """A random HF torch model of ``family`` (tiny dims) saved with ``save_pretrained``."""
    import torch
    import transformers

    cfg = {**BASE, **FAMILIES[family], "vocab_size": vocab_size, **overrides}
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=1, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(1.0)
    model.save_pretrained(path)
