"""Pruning masks: traced array inputs that switch blocks, KV groups and MLP channels off.

All candidates of a search step share one compiled program because masks are values, not shapes.
Arrays are padded to the dense maxima so the structure only depends on the layer count:
``attn, mlp: float32[L]``; ``kv: float32[L, num_key_value_heads]``;
``channels: float32[L, max_mlp_width]``. Layer ``i`` reads ``kv[i, :kv_groups_i]`` and
``channels[i, :mlp_width_i]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from models.spec import ModelSpec


class Masks(NamedTuple):
    attn: jax.Array | np.ndarray
    mlp: jax.Array | np.ndarray
    kv: jax.Array | np.ndarray
    channels: jax.Array | np.ndarray

    def layer(self, i: int) -> LayerMasks:
        return LayerMasks(self.attn[i], self.mlp[i], self.kv[i], self.channels[i])


class LayerMasks(NamedTuple):
    """One layer's row of ``Masks`` (still padded; the layer slices its own prefix)."""

    attn: jax.Array | np.ndarray
    mlp: jax.Array | np.ndarray
    kv: jax.Array | np.ndarray
    channels: jax.Array | np.ndarray


def ones(spec: ModelSpec) -> Masks:
    """All-on masks (numpy) for ``spec``: the unmasked model."""
    n = spec.num_layers
    width = max([layer.mlp_width for layer in spec.layers] + [1])
    return Masks(
        attn=np.ones((n,), np.float32),
        mlp=np.ones((n,), np.float32),
        kv=np.ones((n, spec.num_key_value_heads), np.float32),
        channels=np.ones((n, width), np.float32),
    )


def with_block_off(masks: Masks, kind: str, layer: int) -> Masks:
    """Copy of ``masks`` with the ``kind`` ("attn" or "mlp") block of ``layer`` switched off."""
    arr = np.array(getattr(masks, kind))
    arr[layer] = 0.0
    return masks._replace(**{kind: arr})


def with_width(masks: Masks, kind: str, layer: int, keep: int) -> Masks:
    """Copy of ``masks`` keeping only the first ``keep`` units of ``kind`` ("kv" or "channels")."""
    arr = np.array(getattr(masks, kind))
    arr[layer, keep:] = 0.0
    return masks._replace(**{kind: arr})
