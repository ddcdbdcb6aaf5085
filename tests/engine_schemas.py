"""Numpy forwards that read an exported folder or file the way the serving engines do.

Written from the engines' rules, independently of our model code, so that a wrong key, shape,
permutation or padding in an export shows up as wrong logits here in seconds, without the engines:

* ``decilm_logits``: what vLLM / SGLang / TensorRT-LLM / mlx-lm compute from a DeciLM folder:
  every attention layer has ``num_attention_heads`` query heads and ``num_attention_heads //
  n_heads_in_group`` KV heads, the MLP width is ``find_multiple(int(2 * ffn_mult * hidden / 3),
  256)``, a ``no_op`` block has no tensors at all (a tensor the schema does not describe is an
  error, as in vLLM's strict loader), and rope comes from the legacy ``rope_theta`` /
  ``rope_scaling`` keys (mlx-lm reads only those).
* ``gguf_logits``: what llama.cpp's ``deci`` graph computes from a GGUF file: per-layer head and
  MLP counts from the metadata arrays, q/k in GGML's pairwise rope order, ``rope_freqs`` divisors,
  and llama.cpp's own control flow, including its ``n_ff == 0`` shortcut that drops the layer's
  output (the reason the exporter writes zero MLPs).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA: ``q: [heads, seq, dim]``, ``k, v: [kv_heads, seq, dim]`` -> ``[seq, heads *
    dim]``."""
    heads, seq, dim = q.shape
    k = np.repeat(k, heads // k.shape[0], axis=0)
    v = np.repeat(v, heads // v.shape[0], axis=0)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v
    return out.transpose(1, 0, 2).reshape(seq, heads * dim)


def inverse_frequencies(theta: float, dim: int, scaling: dict | None) -> np.ndarray:
    """``float64[dim // 2]`` rotary inverse frequencies (default, linear or llama3 scaling)."""
    freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        return freq / scaling["factor"]
    if kind == "llama3":
        factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelength = 2 * math.pi / freq
        smooth = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * freq / factor + smooth * freq
    return freq


# ---------------------------------------------------------------------------------------------
# DeciLM


def _rotate_half(x: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """HF rotate-half rope of ``x: [heads, seq, dim]``."""
    angles = np.arange(x.shape[1])[:, None] * freq[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def decilm_width(ffn_mult: float, hidden: int) -> int:
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def _safetensors(folder: str) -> dict[str, np.ndarray]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for file in files:
        weights.update(load_file(os.path.join(folder, file)))
    return {name: w.astype(np.float64) for name, w in weights.items()}


def decilm_logits(folder: str, tokens: np.ndarray) -> np.ndarray:
    """``float64[seq, vocab]`` logits of ``tokens: int[seq]`` as DeciLM engines compute them."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    w = _safetensors(folder)
    used = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        assert w[name].shape == shape, (name, w[name].shape, shape)
        used.add(name)
        return w[name]

    heads, hidden, dim = cfg["num_attention_heads"], cfg["hidden_size"], cfg["head_dim"]
    eps, bias = cfg["rms_norm_eps"], cfg.get("attention_bias", False)
    freq = inverse_frequencies(cfg["rope_theta"], dim, cfg["rope_scaling"])
    x = take("model.embed_tokens.weight", (cfg["vocab_size"], hidden))[tokens]
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        attn, ffn = block["attention"], block["ffn"]
        if not attn["no_op"]:
            kv = heads // attn["n_heads_in_group"]
            h = _rms(x, take(p + "input_layernorm.weight", (hidden,)), eps)
            proj = {}
            for name, rows in (("q", heads), ("k", kv), ("v", kv)):
                proj[name] = h @ take(f"{p}self_attn.{name}_proj.weight", (rows * dim, hidden)).T
                if bias:
                    proj[name] += take(f"{p}self_attn.{name}_proj.bias", (rows * dim,))
            q, k, v = (proj[n].reshape(len(tokens), -1, dim).transpose(1, 0, 2) for n in "qkv")
            out = _attend(_rotate_half(q, freq), _rotate_half(k, freq), v)
            out = out @ take(p + "self_attn.o_proj.weight", (hidden, heads * dim)).T
            x = x + (out + take(p + "self_attn.o_proj.bias", (hidden,)) if bias else out)
        if not ffn["no_op"]:
            width = decilm_width(ffn["ffn_mult"], hidden)
            h = _rms(x, take(p + "post_attention_layernorm.weight", (hidden,)), eps)
            gate = h @ take(p + "mlp.gate_proj.weight", (width, hidden)).T
            up = h @ take(p + "mlp.up_proj.weight", (width, hidden)).T
            x = x + (_silu(gate) * up) @ take(p + "mlp.down_proj.weight", (hidden, width)).T
    x = _rms(x, take("model.norm.weight", (hidden,)), eps)
    if cfg["tie_word_embeddings"]:
        head = w["model.embed_tokens.weight"]
    else:
        head = take("lm_head.weight", (cfg["vocab_size"], hidden))
    unused = set(w) - used
    assert not unused, f"tensors no DeciLM module consumes: {sorted(unused)}"
    return x @ head.T


# ---------------------------------------------------------------------------------------------
# GGUF, llama.cpp arch deci


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, float64 tensors in row-major ``[out, in]`` order) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        x = dequantize(t.data, t.tensor_type).astype(np.float64)
        tensors[t.name] = x.reshape(tuple(int(d) for d in reversed(t.shape)))
    return meta, tensors


def _rotate_pairs(x: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """GGML's normal rope of ``x: [heads, seq, dim]``: consecutive pairs rotate together."""
    angles = np.arange(x.shape[1])[:, None] * freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def gguf_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    """``float64[seq, vocab]`` logits of ``tokens: int[seq]`` as llama.cpp's ``deci`` graph
    computes them (its control flow included)."""
    meta, w = read_gguf(path)
    assert meta["general.architecture"] == "deci"
    heads = meta["deci.attention.head_count"]
    kv_heads = meta["deci.attention.head_count_kv"]
    widths = meta["deci.feed_forward_length"]
    dim, eps = meta["deci.attention.key_length"], meta["deci.attention.layer_norm_rms_epsilon"]
    freq = 1.0 / meta["deci.rope.freq_base"] ** (np.arange(0, dim, 2) / dim)
    if "rope_freqs.weight" in w:
        freq = freq / w["rope_freqs.weight"]
    if meta.get("deci.rope.scaling.type") == "linear":
        freq = freq / meta["deci.rope.scaling.factor"]
    x = w["token_embd.weight"][tokens]
    for il in range(meta["deci.block_count"]):
        b = f"blk.{il}."
        n_head, n_kv, n_ff = heads[il], kv_heads[il], widths[il]
        inp = x
        cur = x
        if n_head > 0:
            h = _rms(x, w[b + "attn_norm.weight"], eps)
            proj = {}
            for name in ("q", "k", "v"):
                proj[name] = h @ w[f"{b}attn_{name}.weight"].T + w.get(f"{b}attn_{name}.bias", 0)
            seq = len(tokens)
            q = proj["q"].reshape(seq, n_head, dim).transpose(1, 0, 2)
            k = proj["k"].reshape(seq, n_kv, dim).transpose(1, 0, 2)
            v = proj["v"].reshape(seq, n_kv, dim).transpose(1, 0, 2)
            cur = _attend(_rotate_pairs(q, freq), _rotate_pairs(k, freq), v)
            cur = cur @ w[b + "attn_output.weight"].T + w.get(b + "attn_output.bias", 0)
        if n_ff == 0:
            continue  # llama.cpp: the layer's result is not carried on (inpL stays)
        ffn_inp = cur + inp if n_head > 0 else cur
        h = _rms(ffn_inp, w[b + "ffn_norm.weight"], eps)
        gate, up = h @ w[b + "ffn_gate.weight"].T, h @ w[b + "ffn_up.weight"].T
        x = ffn_inp + (_silu(gate) * up) @ w[b + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T
