"""Rotary position embeddings in the rotate-half layout that HF checkpoints assume."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from models.spec import RopeSpec


def inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``float32[head_dim // 2]`` for default, linear and llama3 rope."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > low_wavelen, freq / rope.factor, freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return freq


def cos_sin(rope: RopeSpec, head_dim: int, seq_len: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos, sin: float32[seq_len, head_dim]`` for positions ``0..seq_len-1`` (fp32 angles)."""
    positions = np.arange(seq_len, dtype=np.float32)
    angles = positions[:, None] * inv_freq(rope, head_dim)[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def rotate(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x: [batch, seq, heads, head_dim]`` in fp32; returns ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
