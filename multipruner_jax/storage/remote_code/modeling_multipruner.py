"""A Llama-family causal LM whose layers each have their own shapes: MultiPruner compact exports.

This file travels inside every compact export of multipruner-jax and is loaded by stock
transformers through ``config.json``'s ``auto_map``::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It depends on torch and the public API of transformers 5 only (tested with 5.24.0).
``config.json`` is the dense config of the model's family (``llama``, ``mistral``, ``qwen2`` or
``qwen3``, unchanged, so other tools still read it) plus ``multipruner_layers``: one entry per
decoder layer, ``{"num_attention_heads": H, "num_key_value_heads": G, "intermediate_size": W}``,
where ``H`` is ``G`` times the dense query heads per KV head (whole KV groups are pruned),
``H = G = 0`` means the layer's attention block was removed and ``W = 0`` its MLP block. A removed
block has no module, no parameters and no compute; its RMSNorm weight stays (the files keep it,
and MultiPruner counts it), so ``num_parameters()`` matches the pruner's count. Tensor names are
the family's HF names.

The same file also runs ``decilm`` exports (``model_type: nemotron-nas``, the schema that vLLM,
SGLang, TensorRT-LLM and mlx-lm run natively): there ``block_configs`` gives each layer's shapes
the way those engines read them (every attention layer has the dense query-head count, KV heads
``num_attention_heads // n_heads_in_group``, MLP width from ``ffn_mult``), a ``no_op`` block has
no norm either, and ``attention_bias`` gives all four attention projections a bias.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention``; a sliding window is an
explicit mask. Only layers with attention own a KV-cache slot: the ``n``-th such layer uses slot
``n``, so ``Cache.get_seq_length()`` (slot 0) is the number of cached tokens even when layer 0 has
no attention. As transformers builds the slots from ``config.layer_types``, all layers must have
the same attention type (all full or all sliding), which is what MultiPruner exports write.
``generate`` uses the default dynamic cache; static caches (4D masks) are refused.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"modeling_multipruner.py needs transformers 5 or newer (its cache and output API); "
        f"found {transformers.__version__}"
    )
LAYERS_KEY = "multipruner_layers"
DECILM = "nemotron-nas"
# The families this file runs, and how each one's config switches the attention biases
# ("attention_bias": that key gives q, k, v and o a bias or none; "qkv": q, k and v always, o
# never; "none": never), q/k norms, and whether a sliding window applies at all. These are the
# rules of multipruner-jax's family table (models/families.py), copied because this file cannot
# import that package; multipruner-jax's tests check that the two agree.
FAMILIES = {
    "llama": {"biases": "attention_bias", "qk_norm": False, "window": False},
    "mistral": {"biases": "none", "qk_norm": False, "window": True},
    "qwen2": {"biases": "qkv", "qk_norm": False, "window": True},
    "qwen3": {"biases": "attention_bias", "qk_norm": True, "window": True},
    DECILM: {"biases": "attention_bias", "qk_norm": False, "window": True},
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Reading the config


def layer_shapes(config: PretrainedConfig) -> list[tuple[int, int, int]]:
    """``(query heads, KV heads, MLP width)`` of every layer (0: block removed).

    A config without ``multipruner_layers`` describes the dense model.
    """
    if config.model_type == DECILM:
        return _decilm_shapes(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dense_width = config.intermediate_size
    if heads % kv_heads:
        raise ValueError(
            f"config.json num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    entries = getattr(config, LAYERS_KEY, None)
    if entries is None:
        return [(heads, kv_heads, dense_width)] * config.num_hidden_layers
    if not isinstance(entries, list) or len(entries) != config.num_hidden_layers:
        raise ValueError(
            f"config.json {LAYERS_KEY} must be a list with one entry per layer "
            f"({config.num_hidden_layers})"
        )
    shapes = []
    for i, entry in enumerate(entries):
        try:
            shape = tuple(
                int(entry[key])
                for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
            )
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"config.json {LAYERS_KEY}[{i}] must hold integer num_attention_heads, "
                f"num_key_value_heads and intermediate_size"
            ) from None
        h, g, w = shape
        if not (0 <= g <= kv_heads and h == g * (heads // kv_heads) and 0 <= w <= dense_width):
            raise ValueError(
                f"config.json {LAYERS_KEY}[{i}] = {entry} does not fit the dense model "
                f"(at most {kv_heads} KV heads with {heads // kv_heads} query heads each, "
                f"at most {dense_width} MLP channels)"
            )
        shapes.append(shape)
    return shapes


def _decilm_shapes(config: PretrainedConfig) -> list[tuple[int, int, int]]:
    """Per-layer shapes of ``block_configs`` as the DeciLM engines derive them."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    blocks = getattr(config, "block_configs", None)
    if not isinstance(blocks, list) or len(blocks) != config.num_hidden_layers:
        raise ValueError(
            f"config.json block_configs must be a list with one entry per layer "
            f"({config.num_hidden_layers})"
        )
    shapes = []
    for i, block in enumerate(blocks):
        attn, ffn = block["attention"], block["ffn"]
        if attn.get("replace_with_linear") or ffn.get("replace_with_linear"):
            raise ValueError(
                f"config.json block_configs[{i}]: replace_with_linear is not supported"
            )
        kv = 0 if attn["no_op"] else heads // int(attn["n_heads_in_group"])
        width = 0
        if not ffn["no_op"]:
            width = -(-int(2 * float(ffn["ffn_mult"]) * hidden / 3) // 256) * 256
        shapes.append((heads if kv else 0, kv, width))
    return shapes


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of every layer (``None``: full causal attention).

    Cache slots are handed out in layer order to the layers that keep attention, and transformers
    builds the cache's slots from the config's layer types, so those must all be alike."""
    types = getattr(config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise ValueError(
            "config.json layer_types mixes attention types; this model needs one type for all "
            "layers"
        )
    if not FAMILIES[config.model_type]["window"]:
        return None
    window = getattr(config, "sliding_window", None)
    if types is None:
        return window
    return window if types and types[0] == "sliding_attention" else None


def _rope_parameters(config: PretrainedConfig) -> dict:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> torch.Tensor:
    """Rotary inverse frequencies ``float32[head_dim // 2]`` (on the CPU) for default, linear
    and llama3 rope."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    freq = 1.0 / theta**exponents
    if rope_type == "default":
        return freq
    if rope_type == "linear":
        return freq / float(params["factor"])
    if rope_type != "llama3":
        raise ValueError(
            f"config.json rope type {rope_type!r} is not supported; expected default, linear "
            f"or llama3"
        )
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    wavelength = 2 * math.pi / freq
    # Long wavelengths are slowed down by ``factor``, short ones kept, the band between blended.
    scaled = torch.where(wavelength > context / low, freq / factor, freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_band, blended, scaled)


# ---------------------------------------------------------------------------------------------
# Checking the weight files against the config


def _header_shapes(folder: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (file, shape)}`` from the safetensors headers (empty without them)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        return {}
    shapes = {}
    for file in files:
        with open(os.path.join(folder, file), "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        shapes.update({name: (file, tuple(entry["shape"])) for name, entry in header.items()})
    return shapes


def check_weight_files(folder: str, expected: dict[str, tuple[int, ...]], tied: set[str]) -> None:
    """Raise ``ValueError`` naming the first tensor of ``folder`` that disagrees with
    ``expected`` (``{name: shape}``); tensors named in ``tied`` may be absent."""
    found = _header_shapes(folder)
    if not found:
        return
    for name, (file, shape) in found.items():
        if name not in expected:
            raise ValueError(
                f"{os.path.join(folder, file)}: tensor {name} {shape} belongs to no module of "
                f"the model that config.json ({LAYERS_KEY}) describes"
            )
        if shape != expected[name]:
            raise ValueError(
                f"{os.path.join(folder, file)}: tensor {name} has shape {shape}, but config.json "
                f"({LAYERS_KEY}) expects {expected[name]}"
            )
    for name, shape in expected.items():
        if name not in found and name not in tied:
            raise ValueError(
                f"{folder}: tensor {name} of shape {shape} is missing from the weight files, but "
                f"config.json ({LAYERS_KEY}) has it"
            )


# ---------------------------------------------------------------------------------------------
# Modules


class MultiPrunerRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (as the HF Llama family does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., dim]`` -> same shape and dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x: [batch, heads, seq, head_dim]`` with ``cos, sin: [batch, seq,
    head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Grouped-query SDPA: ``q: [batch, heads, seq, head_dim]``, ``k, v: [batch, kv_heads, keys,
    head_dim]``, ``mask: bool[batch or 1, 1, seq, keys]`` (``True``: visible) or ``None`` (causal
    for a square prefill, everything visible for one query). Returns ``q``'s shape."""
    groups = q.shape[1] // k.shape[1]
    if mask is None:
        causal = q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
    if groups > 1 and q.shape[2] == 1:
        # One query: its heads become the query rows of their KV head; the mask is shared.
        b, heads, _, dim = q.shape
        packed = q.reshape(b, heads // groups, groups, dim)
        return F.scaled_dot_product_attention(packed, k, v, attn_mask=mask).reshape(q.shape)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MultiPrunerAttention(nn.Module):
    """Attention over ``kv_heads`` KV heads and ``heads`` query heads; uses cache slot ``slot``."""

    def __init__(self, config: PretrainedConfig, heads: int, kv_heads: int, slot: int):
        super().__init__()
        d, dim = config.hidden_size, _head_dim(config)
        family = FAMILIES[config.model_type]
        flag = bool(getattr(config, "attention_bias", False))
        bias = flag and family["biases"] == "attention_bias"  # o, and q/k/v with it
        qkv_bias = bias or family["biases"] == "qkv"
        self.q_proj = nn.Linear(d, heads * dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_heads * dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_heads * dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * dim, d, bias=bias)
        if family["qk_norm"]:
            self.q_norm = MultiPrunerRMSNorm(dim, config.rms_norm_eps)
            self.k_norm = MultiPrunerRMSNorm(dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.head_dim = dim
        self.slot = slot

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """``x: [batch, seq, hidden]`` -> same shape."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.slot)
        out = _attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MultiPrunerMLP(nn.Module):
    """SwiGLU MLP of ``width`` channels."""

    def __init__(self, config: PretrainedConfig, width: int):
        super().__init__()
        d, bias = config.hidden_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(d, width, bias=bias)
        self.up_proj = nn.Linear(d, width, bias=bias)
        self.down_proj = nn.Linear(width, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [batch, seq, hidden]`` -> same shape."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MultiPrunerDecoderLayer(nn.Module):
    """Pre-norm residual layer; a removed block is ``None``, its norm stays (``decilm``: goes)."""

    def __init__(self, config: PretrainedConfig, shape: tuple[int, int, int], slot: int):
        super().__init__()
        heads, kv_heads, width = shape
        d, eps, keep = config.hidden_size, config.rms_norm_eps, config.model_type != DECILM
        self.input_layernorm = MultiPrunerRMSNorm(d, eps) if heads or keep else None
        self.post_attention_layernorm = MultiPrunerRMSNorm(d, eps) if width or keep else None
        self.self_attn = MultiPrunerAttention(config, heads, kv_heads, slot) if heads else None
        self.mlp = MultiPrunerMLP(config, width) if width else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """``x: [batch, seq, hidden]`` -> same shape."""
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class MultiPrunerModel(nn.Module):
    """``model.*``: embeddings, heterogeneous layers, final norm and the rotary tables."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.model_type not in FAMILIES:
            raise ValueError(
                f"config.json model_type {config.model_type!r} is not supported; expected one "
                f"of {', '.join(FAMILIES)}"
            )
        shapes = layer_shapes(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList()
        for shape in shapes:
            # The cache slot of this layer's attention: the number of attention layers below it.
            slot = sum(1 for layer in self.layers if layer.self_attn is not None)
            self.layers.append(MultiPrunerDecoderLayer(config, shape, slot))
        self.norm = MultiPrunerRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.window = _sliding_window(config)
        self.has_attention = any(h for h, _, _ in shapes)
        # A plain attribute, not a buffer: it is rebuilt from the config, never loaded or saved.
        self.inv_freq = inverse_frequencies(config, _head_dim(config))

    def _mask(
        self,
        attention_mask: torch.Tensor | None,
        past: int,
        queries: int,
        cache: Cache | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """``bool[batch or 1, 1, queries, keys]`` over the keys the cache will return (``True``:
        visible), or ``None`` when plain causal attention is exact."""
        keys, offset = cache.get_mask_sizes(queries, 0) if cache is not None else (queries, 0)
        padded = attention_mask is not None and not bool(attention_mask.all())
        windowed = self.window is not None and past + queries - 1 - self.window >= offset
        if not padded and not windowed and (queries == 1 or (past == 0 and keys == queries)):
            return None
        q_pos = torch.arange(past, past + queries, device=device)[:, None]
        k_pos = torch.arange(offset, offset + keys, device=device)[None, :]
        visible = k_pos <= q_pos
        if self.window is not None:
            visible = visible & (k_pos > q_pos - self.window)
        visible = visible[None, None]
        if attention_mask is not None:
            seen = attention_mask[:, offset : offset + keys].to(device=device, dtype=torch.bool)
            visible = visible & seen[:, None, None, :]
        # A padding query sees no key; let it see all of them so that its (unused) output stays
        # finite instead of NaN.
        return visible | ~visible.any(dim=-1, keepdim=True)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """``inputs_embeds: [batch, seq, hidden]`` -> final-normed hidden states, same shape."""
        x = inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        angles = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = None
        if self.has_attention:
            mask = self._mask(attention_mask, past, x.shape[1], cache, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class MultiPrunerPreTrainedModel(PreTrainedModel):
    """Shared settings: HF tensor prefix ``model``, decoder layers stay whole on one device."""

    base_model_prefix = "model"
    _no_split_modules = ["MultiPrunerDecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that first checks every tensor of a local folder
        against the config and fails with one sentence on the first disagreement."""
        folder = str(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = os.path.join(folder, kwargs["subfolder"])
        if os.path.isdir(folder):
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                config = AutoConfig.from_pretrained(config or folder)
                kwargs["config"] = config
            with torch.device("meta"):
                skeleton = cls(config)
            expected = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
            tied = set(cls._tied_weights_keys) if config.tie_word_embeddings else set()
            check_weight_files(folder, expected, tied)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class MultiPrunerForCausalLM(MultiPrunerPreTrainedModel, GenerationMixin):
    """The pruned causal LM: ``model`` plus ``lm_head`` (tied to the embeddings when the config
    says so)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.model = MultiPrunerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``input_ids: int[batch, seq]`` (or ``inputs_embeds: [batch, seq, hidden]``) ->
        ``logits: [batch, seq or logits_to_keep, vocab]``, the cache, and the loss when
        ``labels: int[batch, seq]`` are given. ``attention_mask: [batch, cached + seq]`` marks
        real tokens with 1; ``past_key_values`` is the transformers 4.x name of ``cache``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and getattr(attention_mask, "ndim", None) != 2:
            raise ValueError(
                "attention_mask must be a [batch, tokens] tensor of 0/1 (4D masks and the static "
                "caches that need them are not supported by this model)"
            )
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = self.model(inputs_embeds, attention_mask, position_ids, cache)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


# ``save_pretrained`` copies this file and keeps ``auto_map`` even when the class was imported
# directly rather than through ``AutoModelForCausalLM``.
MultiPrunerForCausalLM.register_for_auto_class("AutoModelForCausalLM")
