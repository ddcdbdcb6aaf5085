"""Export a pruned ``CausalLM`` to a PyTorch Hugging Face directory, and load such directories back.

Two layouts, both with the *unchanged dense* ``config.json`` (written here from the spec) and HF
tensor names and layout (linear weights ``[out, in]``; ``lm_head.weight`` only when untied):

* ``padded``: every tensor has its dense shape and pruned units are zeros: a removed attention
  block has all-zero q/k/v/o (and biases), a removed MLP all-zero gate/up/down, pruned KV groups
  and MLP channels zero rows of q/k/v (and their biases) / gate/up and zero input columns of
  o_proj / down_proj. Kept units are always a prefix (see ``surgery``), so padding is the exact
  inverse of ``surgery.shrink``: stock ``transformers`` loads the directory with
  ``AutoModelForCausalLM.from_pretrained`` and computes the pruned model's function (exactly, up
  to float rounding), but at the dense model's size and speed.
* ``compact`` (default): the reference's ``extract_model.py`` layout: tensors sliced to their
  pruned shapes, no tensors at all for removed blocks (``model.layers.{i}.self_attn.*`` /
  ``.mlp.*``; their layer norms stay), plus ``pruning_config.json`` in the reference schema. It
  also carries ``modeling_multipruner.py`` (see ``remote_code``), registered in ``config.json``
  by ``auto_map`` beside the per-layer shapes, so stock ``transformers`` loads it with
  ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``; ``load_model`` here
  reads it too.

Files are written to a temporary sibling directory and renamed into place, so a failed export
never leaves a directory that looks complete. Tensors are converted and written one at a time
(safetensors is written by hand, header first), so the host holds about one tensor beyond the
model itself. Run it on one process whose arrays are fully addressable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.spec import LayerSpec, ModelSpec, RopeSpec, SpecError, spec_from_hf_config
from multipruner_jax import checkpoint, hf_io, pruning_config, remote_code

FORMATS = ("padded", "compact")
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
CONFIG_FILE = "config.json"
PRUNING_CONFIG_FILE = "pruning_config.json"

_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_HF_LEAF = {"kernel": "weight", "embedding": "weight"}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# config.json


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


def _family_fields(spec: ModelSpec) -> dict[str, Any]:
    """The keys that differ between llama, mistral, qwen2 and qwen3 configs."""
    if spec.model_type == "llama":
        return {"attention_bias": spec.qkv_bias, "mlp_bias": False, "pretraining_tp": 1}
    if spec.model_type == "mistral":
        return {"sliding_window": spec.sliding_window}
    sliding = spec.sliding_window is not None
    fields: dict[str, Any] = {
        "use_sliding_window": sliding,
        "sliding_window": spec.sliding_window,
        # Our decoder applies the window to every layer, so every layer is a window layer.
        "max_window_layers": 0 if sliding else spec.num_layers,
        "layer_types": [("sliding_attention" if sliding else "full_attention")] * spec.num_layers,
    }
    if spec.model_type == "qwen3":
        fields["attention_bias"] = spec.qkv_bias
    return fields


def hf_config(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """The dense transformers-5 ``config.json`` dict of ``spec``'s family and dimensions.

    Raises ``SpecError`` when the spec is not expressible in its family's config (for example
    biases a Mistral model cannot have): the dict always reads back to the same dense spec.
    """
    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[spec.model_type]],
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
        **_family_fields(spec),
    }
    if spec_from_hf_config(cfg) != dense_spec(spec):
        raise SpecError(f"this {spec.model_type} spec cannot be written as an HF config: {spec}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class _Tensor:
    """One HF tensor: its name and shape, and the parameter it comes from (``None``: zeros)."""

    name: str
    shape: tuple[int, ...]
    source: jax.Array | None
    transpose: bool

    def nbytes(self, dtype: np.dtype) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize

    def array(self, dtype: np.dtype) -> np.ndarray:
        """The C-contiguous HF-layout tensor: the source (transposed for kernels) cast to
        ``dtype`` and zero-padded at the end of every axis up to ``shape``."""
        if self.source is None:
            return np.zeros(self.shape, dtype)
        x = np.asarray(jax.device_get(self.source.astype(dtype)))
        x = x.T if self.transpose else x
        if x.shape == self.shape:
            return np.ascontiguousarray(x)
        out = np.zeros(self.shape, dtype)
        out[tuple(slice(0, n) for n in x.shape)] = x
        return out


def _hf_name(path: tuple[str | int, ...]) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name, whether the tensor is a transposed kernel)."""
    *prefix, leaf = (str(p) for p in path)
    return ".".join([*prefix, _HF_LEAF.get(leaf, leaf)]), leaf == "kernel"


def _tensors(model: CausalLM, fmt: str) -> list[_Tensor]:
    """The tensors to write: the model's own (``compact``), or every dense one (``padded``)."""
    params = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layout = model if fmt == "compact" else decoder.abstract(dense_spec(model.spec))
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(layout, nnx.Param)):
        name, transpose = _hf_name(path)
        shape = tuple(var.get_value().shape)
        tensors.append(
            _Tensor(name, shape[::-1] if transpose else shape, params.get(path), transpose)
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# safetensors files


def _write_safetensors(path: str, tensors: list[_Tensor], dtype_name: str) -> None:
    """Write ``tensors`` as one safetensors file, converting and writing one tensor at a time."""
    dtype = DTYPES[dtype_name]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        end = offset + t.nbytes(dtype)
        header[t.name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype_name],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            f.write(t.array(dtype).reshape(-1).view(np.uint8))


def _plan_shards(tensors: list[_Tensor], dtype: np.dtype, max_bytes: int) -> list[list[_Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_weights(
    folder: str, tensors: list[_Tensor], dtype_name: str, max_shard_bytes: int
) -> None:
    """``model.safetensors``, or HF-named shards plus ``model.safetensors.index.json``."""
    dtype = DTYPES[dtype_name]
    shards = _plan_shards(tensors, dtype, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(os.path.join(folder, hf_io.SINGLE_FILE), tensors, dtype_name)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(folder, file), shard, dtype_name)
        weight_map.update({t.name: file for t in shard})
    total = sum(t.nbytes(dtype) for t in tensors)
    checkpoint.write_json(
        os.path.join(folder, hf_io.INDEX_FILE),
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


# ---------------------------------------------------------------------------------------------
# Output directory


def check_output(out: str, overwrite: bool) -> None:
    """Raise ``FileExistsError`` unless ``out`` is absent, empty, or ``overwrite`` is set."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")


@contextlib.contextmanager
def _staging(out: str) -> Iterator[str]:
    """A fresh temporary sibling of ``out`` that replaces ``out`` on success, vanishes on error."""
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = (os.path.join(parent, f".{name}.{kind}-{tag}") for kind in ("tmp", "old"))
    os.mkdir(tmp)  # unlike mkdtemp, honours the umask: the result is as readable as usual
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = os.path.join(parent, name)
    replaced = os.path.exists(out)
    if replaced:
        os.replace(out, old)
    os.replace(tmp, out)
    if replaced:
        shutil.rmtree(old)


def _save_tokenizer(folder: str, tokenizer: Any) -> None:
    """Copy a tokenizer directory's files (never weights or configs, should it be a model
    directory), or ``save_pretrained`` a tokenizer object."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, str | os.PathLike):
        skip = shutil.ignore_patterns(
            "*.safetensors",
            "*.index.json",
            "*.bin",
            CONFIG_FILE,
            "generation_config.json",
            PRUNING_CONFIG_FILE,
        )
        shutil.copytree(tokenizer, folder, ignore=skip, dirs_exist_ok=True)
    else:
        tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# pruning_config.json


def _shape_key(spec: ModelSpec) -> tuple:
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


def _fits(config: dict[str, Any], spec: ModelSpec) -> bool:
    try:
        pruned = pruning_config.apply(dense_spec(spec), config)
    except pruning_config.PruningConfigError:
        return False
    return _shape_key(pruned) == _shape_key(spec)


def _compact_pruning_config(spec: ModelSpec, given: dict[str, Any] | None) -> dict[str, Any]:
    """``given`` (checked against ``spec``), else the reference schema with removals in layer
    order and no ``weight_reorder`` key (unknown for a bare model)."""
    if given is not None:
        if not _fits(given, spec):
            raise ValueError("the pruning config does not describe the model's per-layer shapes")
        return given
    config = pruning_config.to_dict(
        spec,
        attn_order=[i for i, layer in enumerate(spec.layers) if not layer.has_attn],
        mlp_order=[i for i, layer in enumerate(spec.layers) if not layer.has_mlp],
        weight_reorder=False,
    )
    del config["weight_reorder"]
    return config


def _checkpoint_pruning_config(path: str, spec: ModelSpec) -> dict[str, Any] | None:
    """The search's ``pruning_config.json`` in or next to checkpoint ``path``, if it fits."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        file = os.path.join(folder, PRUNING_CONFIG_FILE)
        if os.path.isfile(file):
            config = pruning_config.load(file)
            if _fits(config, spec):
                return config
            log.warning("%s does not match the checkpoint's shapes; not used", file)
    return None


# ---------------------------------------------------------------------------------------------
# Public API


def _check_options(fmt: str, dtype: str, max_shard_bytes: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")


def export(
    model: CausalLM,
    out: str,
    *,
    fmt: str = "compact",
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer: Any = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``model`` as an HF PyTorch directory ``out`` (see the module docstring).

    Args:
      model: a (pruned) model; any parameter dtype.
      out: output directory; must be absent or empty unless ``overwrite``.
      fmt: ``"compact"`` (pruned shapes, loads with ``trust_remote_code=True``) or ``"padded"``
        (dense shapes, stock transformers classes).
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the tensors' dtype in the files.
      max_shard_bytes: above this many tensor bytes, write shards plus an index.
      tokenizer: a tokenizer directory to copy, or an object with ``save_pretrained``.
      config: ``compact`` only: the search's pruning config (keeps its removal order and
        ``weight_reorder``); default: removals in layer order.
      overwrite: replace a non-empty ``out``.
    """
    _check_options(fmt, dtype, max_shard_bytes)
    if config is not None and fmt != "compact":
        raise ValueError("a pruning config is only written with the compact format")
    check_output(out, overwrite)
    spec = model.spec
    hf_cfg = hf_config(spec, dtype)
    extra = {}
    if fmt == "compact":
        hf_cfg.update(remote_code.config_additions(spec))
        extra[PRUNING_CONFIG_FILE] = _compact_pruning_config(spec, config)
    with _staging(out) as tmp:
        _save_tokenizer(tmp, tokenizer)
        _write_weights(tmp, _tensors(model, fmt), dtype, max_shard_bytes)
        if fmt == "compact":
            shutil.copy(remote_code.MODELING_FILE, tmp)
        for name, obj in {CONFIG_FILE: hf_cfg, **extra}.items():
            checkpoint.write_json(os.path.join(tmp, name), obj)


def export_checkpoint(
    path: str,
    out: str,
    *,
    fmt: str = "compact",
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Export our pruned checkpoint ``path`` (``checkpoint.save``) with its ``tokenizer/``.

    ``compact`` takes the removal order from a ``pruning_config.json`` in ``path`` or its parent
    (where the prune job writes it) when that file matches the checkpoint's shapes. Nothing is
    written when ``path`` is not a checkpoint or ``out`` is in the way.
    """
    _check_options(fmt, dtype, max_shard_bytes)
    spec = checkpoint.load_spec(path)
    check_output(out, overwrite)
    tokenizer = os.path.join(path, checkpoint.TOKENIZER_DIR)
    export(
        checkpoint.restore(path),
        out,
        fmt=fmt,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer if os.path.isdir(tokenizer) else None,
        config=_checkpoint_pruning_config(path, spec) if fmt == "compact" else None,
        overwrite=overwrite,
    )


def read_spec(path: str) -> ModelSpec:
    """The spec of HF directory ``path``: its dense ``config.json`` with ``pruning_config.json``
    applied when present (a ``compact`` export)."""
    spec = hf_io.read_spec(path)
    config_file = os.path.join(path, PRUNING_CONFIG_FILE)
    if os.path.isfile(config_file):
        spec = pruning_config.apply(spec, pruning_config.load(config_file))
    return spec


def load_model(
    path: str,
    dtype: jnp.dtype = jnp.float32,
    sharding_for: hf_io.ShardingFor | None = None,
) -> CausalLM:
    """``hf_io.load_model`` that also reads ``compact`` exports at their pruned shapes."""
    return hf_io.load_model(path, dtype, sharding_for, spec=read_spec(path))
