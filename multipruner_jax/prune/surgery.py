"""Model surgery: importance reordering and slicing parameters to a smaller spec.

Width pruning always keeps a *prefix* of KV groups and MLP channels (after the optional one-time
magnitude reorder), so shrinking a model to a smaller spec is a prefix slice of every parameter
along every axis, and removed blocks simply disappear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoder
from models.decoder import Attention, CausalLM
from models.spec import ModelSpec
from multipruner_jax.base.mesh import ShardingFor, to_host
from multipruner_jax.runtime.inflight import InFlight


def _importance_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep the lower index first (stable)."""
    return np.argsort(-scores, kind="stable")


def _l1_columns(kernel: jax.Array) -> np.ndarray:
    """L1 norm of every output unit (HF weight row = column of our ``[in, out]`` kernel)."""
    return np.abs(to_host(kernel).astype(np.float32)).sum(axis=0)


def _permute(param: nnx.Param, axis: int, order: np.ndarray) -> None:
    param[...] = jax.block_until_ready(jnp.take(param[...], jnp.asarray(order), axis=axis))


def _reorder_mlp(mlp: decoder.MLP) -> None:
    scores = _l1_columns(mlp.gate_proj.kernel[...]) + _l1_columns(mlp.up_proj.kernel[...])
    order = _importance_order(scores)
    _permute(mlp.gate_proj.kernel, 1, order)
    _permute(mlp.up_proj.kernel, 1, order)
    _permute(mlp.down_proj.kernel, 0, order)


def _unit_rows(order: np.ndarray, rows_per_unit: int) -> np.ndarray:
    return (order[:, None] * rows_per_unit + np.arange(rows_per_unit)[None, :]).reshape(-1)


def _reorder_attention(attn: Attention) -> None:
    hd, g = attn.head_dim, attn.q_per_kv
    q = _l1_columns(attn.q_proj.kernel[...])
    k = np.repeat(_l1_columns(attn.k_proj.kernel[...]).reshape(-1, 1, hd), g, axis=1).reshape(-1)
    v = np.repeat(_l1_columns(attn.v_proj.kernel[...]).reshape(-1, 1, hd), g, axis=1).reshape(-1)
    scores = (q + k + v).reshape(attn.kv_groups, g * hd).mean(axis=1)
    order = _importance_order(scores)
    q_rows, kv_rows = _unit_rows(order, g * hd), _unit_rows(order, hd)
    for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        _permute(proj.kernel, 1, rows)
        if proj.bias is not None:
            _permute(proj.bias, 0, rows)
    _permute(attn.o_proj.kernel, 0, q_rows)


def reorder(model: CausalLM) -> None:
    """Permute every layer in place so that more important units come first.

    MLP channels by ``|gate row|_1 + |up row|_1``; attention units (a head for MHA, a whole KV
    group for GQA) by the mean over their q rows of ``|q|_1 + |k|_1 + |v|_1`` with k/v repeated to
    the query layout. The dense model's function is unchanged.
    """
    for layer in model.model.layers:
        if layer.mlp is not None:
            _reorder_mlp(layer.mlp)
        if layer.self_attn is not None:
            _reorder_attention(layer.self_attn)


def shrink(
    model: CausalLM,
    spec: ModelSpec,
    sharding_for: ShardingFor | None = None,
) -> CausalLM:
    """A new model of the smaller ``spec`` whose parameters are prefixes of ``model``'s.

    ``spec`` must keep a subset of blocks and no more KV groups or channels than ``model`` has.
    ``sharding_for(path, shape)`` places each new parameter (default: where the old one was).
    """
    dtype = model.model.norm.weight[...].dtype
    old = nnx.to_flat_state(nnx.state(model))
    old_by_path = {path: var[...] for path, var in old}
    target = decoder.abstract(spec, dtype)
    graphdef, abstract_state = nnx.split(target)
    new_leaves = {}
    in_flight = InFlight()
    for path, var in nnx.to_flat_state(abstract_state):
        if path not in old_by_path:
            raise ValueError(f"cannot shrink: {'.'.join(map(str, path))} is not in the model")
        src = old_by_path[path]
        shape = var.get_value().shape
        if any(n > m for n, m in zip(shape, src.shape, strict=True)):
            raise ValueError(
                f"cannot shrink {'.'.join(map(str, path))} from {src.shape} to larger {shape}"
            )
        sliced = src[tuple(slice(0, n) for n in shape)]
        if sharding_for is not None:
            sliced = jax.device_put(sliced, sharding_for(".".join(map(str, path)), shape))
        new_leaves[path] = in_flight.add(sliced)
    state = nnx.from_flat_state(new_leaves)
    return nnx.merge(graphdef, state)
