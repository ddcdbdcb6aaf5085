"""Model and per-layer shape specification: HF ``config.json`` both ways, JSON, parameter counts.

A ``ModelSpec`` says everything needed to build a decoder: the family-wide constants (vocabulary,
hidden size, rope, norms, biases) and, per layer, what survives pruning: whether the attention and
MLP blocks exist, how many KV groups (each with its ``q_per_kv`` query heads) and how many MLP
channels are kept. A pruned model is therefore just a model built from a smaller spec.

The keys in which the families' configs differ (biases, q/k norms, sliding windows, the
architecture name) are read and written through the family table, ``models/families.py``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from models.families import FAMILIES

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class SpecError(ValueError):
    """A config or spec that this project cannot build a model from."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, normalised from either transformers 4.x or 5.x keys."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer keeps. ``kv_groups`` counts kept KV heads (each with its queries)."""

    has_attn: bool
    kv_groups: int
    has_mlp: bool
    mlp_width: int


@dataclass(frozen=True)
class ModelSpec:
    """A whole decoder: family constants plus one ``LayerSpec`` per layer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    sliding_window: int | None
    max_position_embeddings: int
    layers: tuple[LayerSpec, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace_layers(self, layers: list[LayerSpec] | tuple[LayerSpec, ...]) -> ModelSpec:
        return dataclasses.replace(self, layers=tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        d["rope"] = RopeSpec(**d["rope"])
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        d["eos_token_id"] = _hashable_ids(d.get("eos_token_id"))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))


def _hashable_ids(ids: int | list[int] | None) -> int | tuple[int, ...] | None:
    return tuple(ids) if isinstance(ids, list | tuple) else ids


def _rope_from_hf(cfg: dict[str, Any]) -> RopeSpec:
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise SpecError(
            f"config.json rope type {rope_type!r} is not supported; "
            f"expected one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    kw: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        kw["factor"] = float(params["factor"])
    if rope_type == "llama3":
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeSpec(**kw)


def spec_from_hf_config(cfg: dict[str, Any]) -> ModelSpec:
    """Build a dense ``ModelSpec`` from an HF ``config.json`` dict (transformers 4.x or 5.x)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecError(
            f"config.json model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("mlp_bias"):
        raise SpecError("config.json mlp_bias=true is not supported (Llama-family MLPs have none)")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg["intermediate_size"])
        n_layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise SpecError(f"config.json lacks required key {e.args[0]!r}") from None
    if heads % kv_heads:
        raise SpecError(
            f"config.json num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    family = FAMILIES[model_type]
    qkv_bias, o_bias = family.read_biases(cfg)
    layers = tuple(LayerSpec(True, kv_heads, True, inter) for _ in range(n_layers))
    return ModelSpec(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=family.qk_norm,
        sliding_window=family.read_window(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        layers=layers,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_hashable_ids(cfg.get("eos_token_id")),
    )


def dense_spec(spec: ModelSpec) -> ModelSpec:
    """The unpruned model ``spec`` was cut from: every block, all KV groups and channels."""
    full = LayerSpec(True, spec.num_key_value_heads, True, spec.intermediate_size)
    return spec.replace_layers([full] * spec.num_layers)


def _rope_parameters(rope: RopeSpec) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3"):
        params["factor"] = rope.factor
    if rope.rope_type == "llama3":
        params["low_freq_factor"] = rope.low_freq_factor
        params["high_freq_factor"] = rope.high_freq_factor
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return params


def spec_to_hf_config(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The dense transformers-5 ``config.json`` dict of ``spec``'s family and dimensions.

    The inverse of ``spec_from_hf_config`` up to the per-layer shapes (an HF config is dense).
    Raises ``SpecError`` when the spec is not expressible in its family's config (for example
    biases a Mistral model cannot have): the dict always reads back to ``dense_spec(spec)``.
    """
    family = FAMILIES[spec.model_type]
    cfg: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": spec.model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": _rope_parameters(spec.rope),
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "dtype": dtype,
        **family.write_keys(spec.qkv_bias, spec.sliding_window, spec.num_layers),
    }
    if spec_from_hf_config(cfg) != dense_spec(spec):
        raise SpecError(f"this {spec.model_type} spec cannot be written as an HF config: {spec}")
    return cfg


def load_hf_config(path: str) -> ModelSpec:
    """Read ``path`` (a ``config.json`` file) into a dense ``ModelSpec``."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such config.json") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    return spec_from_hf_config(cfg)


def count_params(spec: ModelSpec) -> int:
    """All parameters of ``spec``: embeddings, LM head (once if tied), norms (also those of
    removed blocks, as the reference counts them), attention and MLP of surviving blocks."""
    d, hd = spec.hidden_size, spec.head_dim
    total = spec.vocab_size * d + d
    if not spec.tie_word_embeddings:
        total += spec.vocab_size * d
    for layer in spec.layers:
        total += 2 * d
        if layer.has_attn:
            q = layer.kv_groups * spec.q_per_kv * hd
            kv = layer.kv_groups * hd
            total += d * (q + 2 * kv) + q * d
            total += (q + 2 * kv) if spec.qkv_bias else 0
            total += d if spec.o_bias else 0
            total += 2 * hd if spec.qk_norm else 0
        if layer.has_mlp:
            total += 3 * d * layer.mlp_width
    return total


def pruned_ratio(spec: ModelSpec, dense: ModelSpec) -> float:
    """Percent of ``dense``'s parameters removed in ``spec``."""
    return 100.0 * (1.0 - count_params(spec) / count_params(dense))
