"""The reference's ``pruning_config.json`` schema, to and from a ``ModelSpec``.

``pruned_attn_idx`` / ``pruned_mlp_idx``: layers whose attention / MLP block is removed, in removal
order; ``pruned_attn_width``: layer -> kept query channels (kept heads x head_dim);
``pruned_mlp_width``: layer -> kept intermediate channels. Keys are strings, every layer appears.
The kept units are a prefix *after* the optional weight reorder, so we also record
``weight_reorder`` beside them; the reference ignores unknown keys.
"""

from __future__ import annotations

import json
from typing import Any

from models.spec import LayerSpec, ModelSpec, dense_spec

FILE = "pruning_config.json"
KEYS = ("pruned_attn_idx", "pruned_mlp_idx", "pruned_attn_width", "pruned_mlp_width")


class PruningConfigError(ValueError):
    """A pruning_config.json that does not fit the model."""


def from_spec(
    spec: ModelSpec,
    *,
    attn_order: list[int],
    mlp_order: list[int],
    weight_reorder: bool | None,
) -> dict[str, Any]:
    """The reference schema for ``spec``; ``*_order`` list removed blocks in removal order.

    ``weight_reorder=None`` (unknown, e.g. for a bare model) leaves the key out.
    """
    unit = spec.head_dim * spec.q_per_kv
    config: dict[str, Any] = {
        "pruned_attn_idx": list(attn_order),
        "pruned_mlp_idx": list(mlp_order),
        "pruned_attn_width": {
            str(i): layer.kv_groups * unit for i, layer in enumerate(spec.layers)
        },
        "pruned_mlp_width": {str(i): layer.mlp_width for i, layer in enumerate(spec.layers)},
    }
    if weight_reorder is not None:
        config["weight_reorder"] = weight_reorder
    return config


def _layer_index(key: Any, n: int, what: str) -> int:
    try:
        i = int(key)
    except (TypeError, ValueError):
        raise PruningConfigError(f"{what}: layer key {key!r} is not an integer") from None
    if not 0 <= i < n:
        raise PruningConfigError(f"{what}: layer {i} is outside 0..{n - 1}")
    return i


def to_spec(dense: ModelSpec, config: dict[str, Any]) -> ModelSpec:
    """The pruned spec that ``config`` describes on top of the ``dense`` spec."""
    n = dense.num_layers
    unit = dense.head_dim * dense.q_per_kv
    layers = [dict(vars(layer)) for layer in dense.layers]
    for key in KEYS:
        if key not in config:
            raise PruningConfigError(f"pruning config lacks {key!r}")
    for i in config["pruned_attn_idx"]:
        layers[_layer_index(i, n, "pruned_attn_idx")]["has_attn"] = False
    for i in config["pruned_mlp_idx"]:
        layers[_layer_index(i, n, "pruned_mlp_idx")]["has_mlp"] = False
    for key, width in config["pruned_attn_width"].items():
        i = _layer_index(key, n, "pruned_attn_width")
        if width % unit or not 0 < width <= dense.num_attention_heads * dense.head_dim:
            raise PruningConfigError(
                f"pruned_attn_width[{i}]={width} is not a positive multiple of one KV group "
                f"({unit} query channels) within the dense width"
            )
        layers[i]["kv_groups"] = width // unit
    for key, width in config["pruned_mlp_width"].items():
        i = _layer_index(key, n, "pruned_mlp_width")
        if not 0 < width <= dense.intermediate_size:
            raise PruningConfigError(
                f"pruned_mlp_width[{i}]={width} is outside 1..{dense.intermediate_size}"
            )
        layers[i]["mlp_width"] = int(width)
    return dense.replace_layers([LayerSpec(**layer) for layer in layers])


def _computed_shapes(spec: ModelSpec) -> tuple:
    """What the layers compute: widths of removed blocks do not matter."""
    return tuple(
        (
            layer.has_attn,
            layer.kv_groups if layer.has_attn else 0,
            layer.has_mlp,
            layer.mlp_width if layer.has_mlp else 0,
        )
        for layer in spec.layers
    )


def describes(config: dict[str, Any], spec: ModelSpec) -> bool:
    """Whether ``config`` on ``spec``'s dense model gives ``spec``'s per-layer shapes."""
    try:
        pruned = to_spec(dense_spec(spec), config)
    except PruningConfigError:
        return False
    return _computed_shapes(pruned) == _computed_shapes(spec)


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PruningConfigError(f"{path}: no such pruning config file") from None
    except json.JSONDecodeError as e:
        raise PruningConfigError(f"{path}: not valid JSON ({e})") from None
