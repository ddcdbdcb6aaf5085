"""Flax NNX decoder for the Llama family (Llama-2/3.x, Mistral, Qwen2/2.5, Qwen3).

Attribute names follow the HF tensor names (``model.layers.N.self_attn.q_proj`` ...), linear
kernels are stored ``[in, out]``. Each layer is built from its own ``LayerSpec``, so layers may
differ in KV groups and MLP width, and a removed block is ``None``. Every ``__call__`` takes
optional masks (see ``models.masks``) as traced arrays: a masked model computes the same function
as the physically smaller model built from the matching spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention, rope
from models.masks import LayerMasks, Masks
from models.spec import LayerSpec, ModelSpec


class RMSNorm(nnx.Module):
    """HF-style RMSNorm: normalise in fp32, cast back, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return self.weight[...] * (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


def _linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention over ``kv_groups`` KV heads, each with ``q_per_kv`` query heads."""

    def __init__(self, spec: ModelSpec, kv_groups: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d, hd = spec.hidden_size, spec.head_dim
        n_q = kv_groups * spec.q_per_kv
        self.q_proj = _linear(d, n_q * hd, spec.qkv_bias, dtype, rngs=rngs)
        self.k_proj = _linear(d, kv_groups * hd, spec.qkv_bias, dtype, rngs=rngs)
        self.v_proj = _linear(d, kv_groups * hd, spec.qkv_bias, dtype, rngs=rngs)
        self.o_proj = _linear(n_q * hd, d, spec.o_bias, dtype, rngs=rngs)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.head_dim = hd
        self.kv_groups = kv_groups
        self.q_per_kv = spec.q_per_kv
        self.sliding_window = spec.sliding_window

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv_mask: jax.Array | None = None
    ) -> jax.Array:
        """``x: [batch, seq, hidden]``; ``kv_mask: float32[>= kv_groups]`` (prefix is used)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, -1, self.head_dim)
        k = self.k_proj(x).reshape(b, t, -1, self.head_dim)
        v = self.v_proj(x).reshape(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        out = attention.causal_attention(q, k, v, self.sliding_window)
        if kv_mask is not None:
            head_mask = jnp.repeat(kv_mask[: self.kv_groups], self.q_per_kv).astype(out.dtype)
            out = out * head_mask[None, None, :, None]
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):
    """SwiGLU MLP of ``width`` intermediate channels."""

    def __init__(self, spec: ModelSpec, width: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d = spec.hidden_size
        self.gate_proj = _linear(d, width, False, dtype, rngs=rngs)
        self.up_proj = _linear(d, width, False, dtype, rngs=rngs)
        self.down_proj = _linear(width, d, False, dtype, rngs=rngs)
        self.width = width

    def __call__(self, x: jax.Array, channel_mask: jax.Array | None = None) -> jax.Array:
        """``x: [batch, seq, hidden]``; ``channel_mask: float32[>= width]`` (prefix is used)."""
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if channel_mask is not None:
            h = h * channel_mask[: self.width].astype(h.dtype)
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    """Pre-norm residual layer; a removed block is ``None`` and its norm is kept (as in HF)."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, eps, dtype)
        self.self_attn = (
            Attention(spec, layer.kv_groups, dtype, rngs=rngs) if layer.has_attn else None
        )
        self.mlp = MLP(spec, layer.mlp_width, dtype, rngs=rngs) if layer.has_mlp else None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        masks: LayerMasks | None = None,
        *,
        skip_off: bool = True,
    ) -> jax.Array:
        """``x: [batch, seq, hidden]`` -> same shape.

        A block whose mask (``masks.attn`` / ``masks.mlp``) is 0 leaves the residual stream
        unchanged, exactly as when the block is removed. With ``skip_off`` (the default) it is
        skipped (``lax.cond``); without, it is computed and discarded (a select): a program run by
        groups of devices that may disagree on a mask must not branch around the collectives of a
        sharded block, where XLA:CPU deadlocks.
        """
        if self.self_attn is not None:
            kv = None if masks is None else masks.kv

            def attend(x: jax.Array) -> jax.Array:
                return x + self.self_attn(self.input_layernorm(x), cos, sin, kv)

            x = attend(x) if masks is None else _unless_off(masks.attn, attend, x, skip_off)
        if self.mlp is not None:
            channels = None if masks is None else masks.channels

            def feed_forward(x: jax.Array) -> jax.Array:
                return x + self.mlp(self.post_attention_layernorm(x), channels)

            x = (
                feed_forward(x)
                if masks is None
                else _unless_off(masks.mlp, feed_forward, x, skip_off)
            )
        return x


def _unless_off(on: jax.Array, block, x: jax.Array, skip: bool) -> jax.Array:
    """``block(x)`` when the scalar mask ``on`` is non-zero, else ``x`` (``block`` is skipped, or
    without ``skip`` computed and discarded)."""
    if skip:
        return jax.lax.cond(on != 0, block, lambda x: x, x)
    return jnp.where(on != 0, block(x), x)


class DecoderModel(nnx.Module):
    """``model.*`` of an HF causal LM: embeddings, layers and the final norm."""

    def __init__(self, spec: ModelSpec, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            spec.vocab_size, spec.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [DecoderLayer(spec, layer, dtype, rngs=rngs) for layer in spec.layers]
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class CausalLM(nnx.Module):
    """Decoder plus LM head (``lm_head`` is ``None`` when tied to the embeddings)."""

    def __init__(self, spec: ModelSpec, dtype: jnp.dtype = jnp.float32, *, rngs: nnx.Rngs):
        self.spec = spec
        self.model = DecoderModel(spec, dtype, rngs=rngs)
        self.lm_head = (
            None
            if spec.tie_word_embeddings
            else _linear(spec.hidden_size, spec.vocab_size, False, dtype, rngs=rngs)
        )

    def rope_tables(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
        return rope.cos_sin(self.spec.rope, self.spec.head_dim, seq_len)

    def hidden_states(self, tokens: jax.Array, masks: Masks | None = None) -> jax.Array:
        """``tokens: int32[batch, seq]`` -> final-normed ``[batch, seq, hidden]``."""
        cos, sin = self.rope_tables(tokens.shape[1])
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if masks is None else masks.layer(i))
        return self.model.norm(x)

    def output_embedding(self) -> jax.Array:
        """LM-head matrix ``[hidden, vocab]`` (the transposed embedding when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(self, tokens: jax.Array, masks: Masks | None = None) -> jax.Array:
        """``tokens: int32[batch, seq]`` -> logits ``[batch, seq, vocab]`` (model dtype)."""
        return self.hidden_states(tokens, masks) @ self.output_embedding()


def build(spec: ModelSpec, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> CausalLM:
    """A randomly initialised model of ``spec`` (tests; real weights come from ``hf_io``)."""
    return CausalLM(spec, dtype, rngs=nnx.Rngs(seed))


def abstract(spec: ModelSpec, dtype: jnp.dtype = jnp.float32) -> CausalLM:
    """Shape-only model of ``spec``: no memory is allocated for its parameters."""
    return nnx.eval_shape(lambda: CausalLM(spec, dtype, rngs=nnx.Rngs(0)))
