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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_index(key: Any, n: int, what: str) -> int:
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if not _is_int(key):
        raise PruningConfigError(f"{what}: layer {key!r} is not an integer layer index")
    if not 0 <= key < n:
        raise PruningConfigError(f"{what}: layer {key} is outside 0..{n - 1} (the model has {n})")
    return key


def _removed_layers(config: dict[str, Any], key: str, n: int) -> set[int]:
    value = config[key]
    if not isinstance(value, list):
        raise PruningConfigError(f"{key} must be a list of layer indices, got {value!r}")
    layers = [_layer_index(i, n, key) for i in value]
    if len(set(layers)) != len(layers):
        raise PruningConfigError(f"{key} lists a layer more than once: {value}")
    return set(layers)


def _widths(config: dict[str, Any], key: str, n: int) -> dict[int, int]:
    """``config[key]`` as ``{layer: width}`` with every layer ``0..n-1`` exactly once."""
    value = config[key]
    if not isinstance(value, dict):
        raise PruningConfigError(f"{key} must map every layer to a width, got {value!r}")
    widths: dict[int, int] = {}
    for k, width in value.items():
        i = _layer_index(k, n, key)
        if i in widths:
            raise PruningConfigError(f"{key} gives layer {i} twice")
        if not _is_int(width):
            raise PruningConfigError(f"{key}[{i}]={width!r} is not an integer channel count")
        widths[i] = width
    missing = sorted(set(range(n)) - set(widths))
    if missing:
        raise PruningConfigError(
            f"{key} lacks layers {_ranges(missing)} of the {n}-layer model "
            "(was it made for another model?)"
        )
    return widths


def _ranges(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3..5, 9"``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def to_spec(dense: ModelSpec, config: dict[str, Any]) -> ModelSpec:
    """The pruned spec that ``config`` describes on top of the ``dense`` spec.

    Every layer of ``dense`` must appear in both width maps; widths are integers within the dense
    width, attention widths whole KV groups (multiples of ``head_dim x q_per_kv``).
    """
    if not isinstance(config, dict):
        raise PruningConfigError(f"a pruning config is a JSON object, got {type(config).__name__}")
    missing = [key for key in KEYS if key not in config]
    if missing:
        raise PruningConfigError(f"pruning config lacks {', '.join(map(repr, missing))}")
    n = dense.num_layers
    unit = dense.head_dim * dense.q_per_kv
    full_attn = dense.num_attention_heads * dense.head_dim
    no_attn = _removed_layers(config, "pruned_attn_idx", n)
    no_mlp = _removed_layers(config, "pruned_mlp_idx", n)
    attn = _widths(config, "pruned_attn_width", n)
    mlp = _widths(config, "pruned_mlp_width", n)
    layers = []
    for i in range(n):
        if attn[i] % unit or not 0 < attn[i] <= full_attn:
            raise PruningConfigError(
                f"pruned_attn_width[{i}]={attn[i]} is not a positive multiple of one KV group "
                f"({unit} query channels) up to the dense width {full_attn}"
            )
        if not 0 < mlp[i] <= dense.intermediate_size:
            raise PruningConfigError(
                f"pruned_mlp_width[{i}]={mlp[i]} is outside 1..{dense.intermediate_size}"
            )
        layers.append(LayerSpec(i not in no_attn, attn[i] // unit, i not in no_mlp, mlp[i]))
    return dense.replace_layers(layers)


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
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PruningConfigError(f"{path}: no such pruning config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PruningConfigError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise PruningConfigError(f"{path} is a directory, not a pruning config file") from None
