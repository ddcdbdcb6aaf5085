"""Causal grouped-query attention: XLA's fused kernel, or a blocked one for long CPU sequences.

On GPU and TPU, and for sequences of at most ``BLOCK`` tokens, ``jax.nn.dot_product_attention``
is used. On CPU it is slow at long sequences:
XLA materialises the whole masked ``[query, key]`` score matrix in fp32 and streams it through
memory several times (scale, mask, max, exp, sum, divide), and computes the masked half. The
blocked version walks key blocks with an online softmax (as flash attention does), so scores stay
in cache, and skips the blocks that the causal mask or sliding window hides entirely. Everything
is fp32 (scores, softmax, accumulation); only the summation order differs from the fused kernel
(about 1e-6 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 256
_NEG = float(jnp.finfo(jnp.float32).min)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """Softmax attention of each position over itself and earlier ones (optionally windowed).

    Args:
      q: ``[batch, seq, kv_heads * q_per_kv, head_dim]``; query head ``n`` reads KV head
        ``n // q_per_kv``, as HF ``repeat_kv``.
      k, v: ``[batch, seq, kv_heads, head_dim]``.
      sliding_window: if set, a query sees at most this many keys (itself included).

    Returns:
      ``[batch, seq, kv_heads * q_per_kv, head_dim]`` in ``q``'s dtype.
    """
    t = q.shape[1]
    if jax.default_backend() == "cpu" and t > BLOCK:
        return blocked_attention(q, k, v, sliding_window)
    window = None
    if sliding_window is not None and t > sliding_window:
        window = (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sliding_window: int | None = None,
    block: int = BLOCK,
) -> jax.Array:
    """``causal_attention`` computed block by block (shapes as there).

    The sequence is padded to a multiple of ``block``; padded keys sit after every real query,
    so the causal mask already hides them, and padded query rows are dropped.
    """
    b, t, n, h = q.shape
    groups = k.shape[2]
    size = min(block, t)
    blocks = -(-t // size)
    pad = ((0, 0), (0, blocks * size - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    # [blocks, b, kv, g, size, h] and [blocks, b, kv, size, h]
    qb = q.reshape(b, blocks, size, groups, n // groups, h).transpose(1, 0, 3, 4, 2, 5)
    kb = k.reshape(b, blocks, size, groups, h).transpose(1, 0, 3, 2, 4)
    vb = v.reshape(b, blocks, size, groups, h).transpose(1, 0, 3, 2, 4)

    def query_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qi, i = args
        return _query_block(qi, i, kb, vb, sliding_window)

    out = jax.lax.map(query_block, (qb, jnp.arange(blocks)))
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, blocks * size, n, h)
    return out[:, :t].astype(q.dtype)


def _query_block(
    qi: jax.Array, i: jax.Array, kb: jax.Array, vb: jax.Array, window: int | None
) -> jax.Array:
    """Attention of query block ``i`` (``qi: [b, kv, g, size, h]``) over the key blocks it sees."""
    size, h = qi.shape[-2:]
    q_pos = i * size + jnp.arange(size)[:, None]
    scale = jnp.float32(h**-0.5)

    def update(carry: tuple, j: jax.Array) -> tuple:
        """Online-softmax step over key block ``j``: running max, sum and weighted values."""
        m, total, acc = carry
        s = jnp.einsum("bkgqh,bksh->bkgqs", qi, kb[j], preferred_element_type=jnp.float32)
        k_pos = j * size + jnp.arange(size)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        s = jnp.where(visible, s * scale, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        total = total * correction + p.sum(axis=-1)
        pv = jnp.einsum("bkgqs,bksh->bkgqh", p, vb[j], preferred_element_type=jnp.float32)
        return m_new, total, acc * correction[..., None] + pv

    def step(carry: tuple, j: jax.Array) -> tuple[tuple, None]:
        seen = j <= i
        if window is not None:
            seen &= (j + 1) * size - 1 > i * size - window
        return jax.lax.cond(seen, update, lambda c, _: c, carry, j), None

    init = (
        jnp.full(qi.shape[:-1], _NEG, jnp.float32),
        jnp.zeros(qi.shape[:-1], jnp.float32),
        jnp.zeros(qi.shape, jnp.float32),
    )
    (_, total, acc), _ = jax.lax.scan(step, init, jnp.arange(kb.shape[0]))
    return acc / total[..., None]
