"""The one chunked fp32 cross-entropy: ``-log p(target)`` from hidden states and the stored head
weight, ``token_chunk`` positions at a time, so that full ``[..., positions, vocab]`` logits never
exist.

Scoring (per-row NLL sums of calibration rows), log-likelihoods (continuation positions, with
greedy flags) and LoRA fine-tuning (a weighted sum, differentiated) all call ``chunked_nll``.
Positions run along the second-to-last axis of ``h``; leading axes are rows that share each chunk
(LoRA chunks ``token_chunk`` positions of every row at once; scoring and log-likelihoods pass
positions already flattened). Chunks are a ``lax.scan`` over a zero-padded positions axis; the
head weight is used in place: the embedding ``[V, D]`` when tied, else the head kernel
``[D, V]``, never transposed. ``remat`` recomputes a chunk's logits in the backward pass instead of
keeping one ``[chunk, V]`` block per step of the scan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.decoder import CausalLM


def output_weight(model: CausalLM) -> tuple[jax.Array, bool]:
    """The LM head weight as stored (embedding ``[V, D]`` if tied, else ``[D, V]``), and tied."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...], True
    return model.lm_head.kernel[...], False


def chunked_nll(
    h: jax.Array,
    targets: jax.Array,
    w_out: jax.Array,
    tied: bool,
    token_chunk: int,
    *,
    weights: jax.Array | None = None,
    greedy: bool = False,
    remat: bool = False,
):
    """The fp32 NLL of ``targets: int32[..., n]`` given ``h: [..., n, D]``.

    Without ``weights``: ``(nll: float32[..., n], hit)``, where ``hit: bool[..., n]`` says
    whether each target is the argmax of its logits when ``greedy`` (else ``None``). With
    ``weights: float32[..., n]``: the weighted sum ``float32[]`` (no per-position output; not
    with ``greedy``). ``w_out``, ``tied``: see ``output_weight``.
    """
    if weights is not None and greedy:
        raise ValueError("chunked_nll: greedy flags come per position, not with a weighted sum")
    n, d = h.shape[-2:]
    rows = h.shape[:-2]
    chunk = min(token_chunk, n)
    chunks = math.ceil(n / chunk)
    pad = [(0, 0)] * len(rows) + [(0, chunks * chunk - n)]

    def split(x: jax.Array, *tail: int) -> jax.Array:
        """``[..., n, *tail]`` -> ``[chunks, ..., chunk, *tail]``."""
        x = jnp.pad(x, pad + [(0, 0)] * len(tail))
        return jnp.moveaxis(x.reshape(*rows, chunks, chunk, *tail), len(rows), 0)

    contract = 1 if tied else 0

    def per_chunk(h_c, t_c, *w_c):
        logits = jax.lax.dot_general(
            h_c,
            w_out,
            (((h_c.ndim - 1,), (contract,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        nll = jax.nn.logsumexp(logits, axis=-1)
        nll = nll - jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        if w_c:
            return jnp.sum(nll * w_c[0])
        return (nll, jnp.argmax(logits, axis=-1) == t_c) if greedy else nll

    if remat:
        per_chunk = jax.checkpoint(per_chunk)
    hs, ts = split(h, d), split(targets)
    if weights is not None:
        ws = split(weights)
        if chunks == 1:
            return per_chunk(hs[0], ts[0], ws[0])

        def add(total, xs):
            return total + per_chunk(*xs), None

        total, _ = jax.lax.scan(add, jnp.zeros((), jnp.float32), (hs, ts, ws))
        return total

    _, out = jax.lax.scan(lambda _, xs: (None, per_chunk(*xs)), None, (hs, ts))

    def join(x: jax.Array) -> jax.Array:
        """``[chunks, ..., chunk]`` -> ``[..., n]``."""
        return jnp.moveaxis(x, 0, len(rows)).reshape(*rows, chunks * chunk)[..., :n]

    if greedy:
        return join(out[0]), join(out[1])
    return join(out), None
