"""Export a pruned ``CausalLM`` to a PyTorch Hugging Face directory (``hf_io`` reads them back).

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
  ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``; ``hf_io`` reads it
  too.

Files are written to a temporary sibling directory and renamed into place, so a failed export
never leaves a directory that looks complete. Tensors are converted and written one at a time
(safetensors is written by hand, header first), so the host holds about one tensor beyond the
model itself. Run it on one process whose arrays are fully addressable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.hf_names import hf_name
from models.spec import ModelSpec, dense_spec, spec_to_hf_config
from multipruner_jax import atomic, checkpoint, hf_io, pruning_config, remote_code

FORMATS = ("padded", "compact")
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

log = logging.getLogger(__name__)


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


def _tensors(model: CausalLM, fmt: str) -> list[_Tensor]:
    """The tensors to write: the model's own (``compact``), or every dense one (``padded``)."""
    params = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layout = model if fmt == "compact" else decoder.abstract(dense_spec(model.spec))
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(layout, nnx.Param)):
        name, transpose = hf_name(path)
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
    atomic.write_json(
        os.path.join(folder, hf_io.INDEX_FILE),
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


# ---------------------------------------------------------------------------------------------
# Output directory


def check_output(
    out: str,
    overwrite: bool,
    flag: str = "--out",
    overwrite_flag: str = "--overwrite",
    source: str | None = None,
) -> None:
    """Raise ``FileExistsError`` unless ``out`` is absent, empty, or ``overwrite`` is set, and
    ``ValueError`` when writing ``out`` would replace the checkpoint ``source`` it exports."""
    atomic.check_writable_over(out, flag, source)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{flag}={out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(
            f"{flag}={out} exists and is not empty; pass {overwrite_flag} to replace it"
        )


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
            hf_io.CONFIG_FILE,
            "generation_config.json",
            pruning_config.FILE,
        )
        shutil.copytree(tokenizer, folder, ignore=skip, dirs_exist_ok=True)
    else:
        tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# pruning_config.json


def _compact_pruning_config(spec: ModelSpec, given: dict[str, Any] | None) -> dict[str, Any]:
    """``given`` (checked against ``spec``), else the reference schema with removals in layer
    order and no ``weight_reorder`` key (unknown for a bare model)."""
    if given is not None:
        if not pruning_config.describes(given, spec):
            raise ValueError("the pruning config does not describe the model's per-layer shapes")
        return given
    return pruning_config.from_spec(
        spec,
        attn_order=[i for i, layer in enumerate(spec.layers) if not layer.has_attn],
        mlp_order=[i for i, layer in enumerate(spec.layers) if not layer.has_mlp],
        weight_reorder=None,
    )


def _checkpoint_pruning_config(path: str, spec: ModelSpec) -> dict[str, Any] | None:
    """The search's ``pruning_config.json`` in or next to checkpoint ``path``, if it fits."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        file = os.path.join(folder, pruning_config.FILE)
        if os.path.isfile(file):
            config = pruning_config.load(file)
            if pruning_config.describes(config, spec):
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
    config_json = spec_to_hf_config(spec, dtype)
    files = {hf_io.CONFIG_FILE: config_json}
    if fmt == "compact":
        config_json.update(remote_code.config_additions(spec))
        files[pruning_config.FILE] = _compact_pruning_config(spec, config)
    with atomic.directory(out) as tmp:
        _save_tokenizer(str(tmp), tokenizer)
        _write_weights(str(tmp), _tensors(model, fmt), dtype, max_shard_bytes)
        if fmt == "compact":
            shutil.copy(remote_code.MODELING_FILE, tmp)
        for name, obj in files.items():
            atomic.write_json(tmp / name, obj)


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
    path = checkpoint.locate(path)
    spec = checkpoint.load_spec(path)
    check_output(out, overwrite, source=path)
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
