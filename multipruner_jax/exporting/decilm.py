"""The ``decilm`` serving layout: NVIDIA's heterogeneous Llama schema (DeciLM / Nemotron-NAS).

vLLM, SGLang, TensorRT-LLM (PyTorch backend) and mlx-lm run ``DeciLMForCausalLM`` natively: one
``block_configs`` entry per layer says whether its attention and MLP blocks exist
(``no_op``), the KV-head count as ``num_attention_heads // n_heads_in_group``, and the MLP width
as ``find_multiple(int(2 * ffn_mult * hidden / 3), 256)``. How a pruned layer maps:

* A removed block is ``no_op`` and has **no tensors at all**, its RMSNorm included (vLLM refuses
  the norm of a removed block). Exact.
* Layer 0 without attention gets a zero attention with one KV head (``n_heads_in_group = H``):
  vLLM and SGLang crash on a layer-0 ``no_op`` attention.
* An MLP width ``W`` is exact when it is a multiple of 256 (``ffn_mult = round(3 * (W - 128) /
  (2 * hidden), 6)`` lands in ``(W - 256, W]``); other widths get zero channels up to the next
  multiple of 256.
* Query heads are fixed at the dense ``H`` in every engine. A layer that kept ``k`` of ``K`` KV
  groups (``g = H / K`` query heads each) is written with ``k'`` KV heads, the smallest divisor of
  ``H`` that is at least ``k``, so each written group has ``g' = H / k'`` query slots: the real
  heads of group ``i`` go to slots ``i * g' ...``, the other slots are zero query heads with zero
  ``o_proj`` columns, and KV groups ``k ... k' - 1`` are zero.

``config.json`` carries both rope spellings (mlx-lm reads only the legacy ``rope_theta`` and
defaults it to 500000), an explicit ``head_dim`` (NVIDIA's config class defaults it to 128), and
``auto_map`` entries for our own config class and our modeling file, so transformers (and lm-eval)
load the folder too. Qwen2's q/k/v biases are written as ``attention_bias`` with a zero
``o_proj.bias`` (mlx-lm gives every attention projection a bias under that key).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from models.spec import ModelSpec, spec_to_hf_config
from multipruner_jax.exporting.padding import Padding
from multipruner_jax.exporting.tensor_files import Tensor, by_name, model_tensors
from multipruner_jax.storage import remote_code

_REMOTE = os.path.dirname(remote_code.MODELING_FILE)
# Shipped beside ``remote_code.MODELING_FILE``: our config class, and the model entry point.
CONFIG_FILE = os.path.join(_REMOTE, "configuration_decilm.py")
ENTRY_FILE = os.path.join(_REMOTE, "modeling_decilm.py")
FILES = (CONFIG_FILE, ENTRY_FILE)
ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
FAMILIES = ("llama", "mistral", "qwen2")
WIDTH_MULTIPLE = 256
# Keys of the family's dense config that describe every layer alike; ``block_configs`` replaces
# them, and the sliding window is not part of the schema.
_DENSE_ONLY = (
    "num_key_value_heads",
    "intermediate_size",
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "pretraining_tp",
    "mlp_bias",
)


def written_width(width: int) -> int:
    """``width`` rounded up to the multiple of 256 the schema can express."""
    return -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def engine_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width every DeciLM engine derives from ``ffn_mult``."""
    return written_width(int(2 * ffn_mult * hidden / 3))


def ffn_mult(width: int, hidden: int) -> float:
    """The ``ffn_mult`` that engines turn back into ``width`` (a multiple of 256)."""
    mult = round(3 * (width - WIDTH_MULTIPLE // 2) / (2 * hidden), 6)
    if engine_width(mult, hidden) != width:
        raise ValueError(f"no ffn_mult gives MLP width {width} at hidden size {hidden}")
    return mult


def kv_slots(kept: int, heads: int) -> int:
    """KV heads written for ``kept`` KV groups: the smallest divisor of ``heads`` >= ``kept``."""
    return next(d for d in range(kept, heads + 1) if heads % d == 0)


def written_kv_heads(spec: ModelSpec, i: int) -> int:
    """KV heads written for layer ``i``: ``kv_slots`` of its kept groups; for a removed attention
    block 0 (``no_op``), except in layer 0, which gets a zero attention with one KV head."""
    layer = spec.layers[i]
    if layer.has_attn:
        return kv_slots(layer.kv_groups, spec.num_attention_heads)
    return 1 if i == 0 else 0


def _query_rows(spec: ModelSpec, kept: int, slots: int) -> np.ndarray:
    """Row index (into the written ``q_proj``) of every row of the real ``q_proj``."""
    g, slot_size, dim = spec.q_per_kv, spec.num_attention_heads // slots, spec.head_dim
    heads = [group * slot_size + r for group in range(kept) for r in range(g)]
    return np.concatenate([np.arange(h * dim, (h + 1) * dim) for h in heads])


def _rope_legacy(spec: ModelSpec) -> dict[str, Any]:
    rope = spec.rope
    keys: dict[str, Any] = {"rope_theta": rope.theta, "rope_scaling": None}
    if rope.rope_type == "linear":
        keys["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": rope.factor}
    elif rope.rope_type == "llama3":
        keys["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return keys


def block_configs(spec: ModelSpec) -> list[dict[str, Any]]:
    """One ``{"attention": ..., "ffn": ...}`` entry per layer, every key spelled out."""
    heads, hidden = spec.num_attention_heads, spec.hidden_size
    entries = []
    for i, layer in enumerate(spec.layers):
        attn_slots = written_kv_heads(spec, i)
        entries.append(
            {
                "attention": {
                    "no_op": attn_slots == 0,
                    "replace_with_linear": False,
                    "n_heads_in_group": heads // attn_slots if attn_slots else None,
                },
                "ffn": {
                    "no_op": not layer.has_mlp,
                    "replace_with_linear": False,
                    "ffn_mult": (
                        ffn_mult(written_width(layer.mlp_width), hidden) if layer.has_mlp else None
                    ),
                },
            }
        )
    return entries


def _module(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def config(spec: ModelSpec, dtype: str) -> dict[str, Any]:
    """``config.json`` of the DeciLM folder."""
    cfg = {k: v for k, v in spec_to_hf_config(spec, dtype).items() if k not in _DENSE_ONLY}
    cfg.update(_rope_legacy(spec))
    cfg.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        attention_bias=spec.qkv_bias or spec.o_bias,
        block_configs=block_configs(spec),
        auto_map={
            "AutoConfig": f"{_module(CONFIG_FILE)}.DeciLMConfig",
            "AutoModelForCausalLM": f"{_module(ENTRY_FILE)}.{ARCHITECTURE}",
        },
    )
    return cfg


def _attention(spec: ModelSpec, i: int, own: dict[str, Tensor], padding: Padding) -> list[Tensor]:
    """Layer ``i``'s norm and q/k/v/o tensors (nothing for a removed block above layer 0)."""
    layer, p, slots = spec.layers[i], f"model.layers.{i}.", written_kv_heads(spec, i)
    if not slots:
        return []
    heads, dim, hidden = spec.num_attention_heads, spec.head_dim, spec.hidden_size
    rows = _query_rows(spec, layer.kv_groups, slots) if layer.has_attn else None

    def place(name: str, shape: tuple[int, ...], index: Any = None) -> Tensor:
        src = own.get(p + name) if layer.has_attn else None
        if src is None:
            return Tensor(p + name, shape, None, False)
        return Tensor(p + name, shape, src.source, src.transpose, index)

    q, k = (heads * dim, hidden), (slots * dim, hidden)
    out = [
        own[p + "input_layernorm.weight"],
        place("self_attn.q_proj.weight", q, None if rows is None else (rows, slice(None))),
        place("self_attn.k_proj.weight", k),
        place("self_attn.v_proj.weight", k),
        place("self_attn.o_proj.weight", q[::-1], None if rows is None else (slice(None), rows)),
    ]
    if spec.qkv_bias or spec.o_bias:
        out += [
            place("self_attn.q_proj.bias", q[:1], None if rows is None else (rows,)),
            place("self_attn.k_proj.bias", k[:1]),
            place("self_attn.v_proj.bias", k[:1]),
            place("self_attn.o_proj.bias", (hidden,)),
        ]
        if not spec.o_bias:
            padding.add(i, "zero o_proj bias (mlx-lm biases all four projections)", hidden)
    real = 2 * layer.kv_groups * (spec.q_per_kv + 1) * dim * hidden
    written = 2 * (heads + slots) * dim * hidden
    if not layer.has_attn:
        padding.add(i, "zero attention with one KV head (vLLM and SGLang need layer 0's)", written)
    elif written > real:
        padding.add(
            i,
            f"{layer.kv_groups} of {spec.num_key_value_heads} KV groups written as {slots} KV "
            f"heads and {heads} query heads",
            written - real,
        )
    return out


def _mlp(spec: ModelSpec, i: int, own: dict[str, Tensor], padding: Padding) -> list[Tensor]:
    """Layer ``i``'s norm and MLP tensors, zero channels up to a multiple of 256."""
    layer, p, hidden = spec.layers[i], f"model.layers.{i}.", spec.hidden_size
    if not layer.has_mlp:
        return []
    width = written_width(layer.mlp_width)
    out = [own[p + "post_attention_layernorm.weight"]]
    for name in ("gate_proj", "up_proj", "down_proj"):
        src = own[f"{p}mlp.{name}.weight"]
        shape = (hidden, width) if name == "down_proj" else (width, hidden)
        out.append(Tensor(src.name, shape, src.source, src.transpose))
    extra = 3 * (width - layer.mlp_width) * hidden
    padding.add(i, f"MLP width {layer.mlp_width} written as {width}", extra)
    return out


def tensors(model: Any) -> tuple[list[Tensor], Padding]:
    """The DeciLM tensors of ``model`` (HF names, padded as the module docstring says)."""
    spec: ModelSpec = model.spec
    own = by_name(model_tensors(model))
    padding = Padding()
    out = [own["model.embed_tokens.weight"]]
    for i in range(spec.num_layers):
        out += _attention(spec, i, own, padding) + _mlp(spec, i, own, padding)
    out.append(own["model.norm.weight"])
    if "lm_head.weight" in own:
        out.append(own["lm_head.weight"])
    return out, padding
