"""HF-named tensors of a model, built lazily one at a time, and the safetensors writer.

Every export format lists the tensors it writes as ``Tensor`` entries: an HF name, the shape in the
file, and where the values come from (one of the model's parameters, placed into a possibly larger
zero tensor, or nothing: all zeros). Nothing is materialised until a writer asks for the array, so
an export holds about one tensor beyond the model itself.
"""

from __future__ import annotations

import json
import os
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
from models.spec import dense_spec
from multipruner_jax.base import atomic
from multipruner_jax.storage.hf_io import SINGLE_FILE

# The dtypes an export may write its floating-point tensors in (numpy dtypes of the files).
FILE_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

Index = tuple[slice | np.ndarray, ...]


@dataclass(frozen=True)
class Tensor:
    """One HF tensor: its name and shape, and the parameter it comes from (``None``: zeros).

    ``index`` says where the source goes in the (larger) tensor: ``out[index] = source``; the
    default is the leading corner (zero padding at the end of every axis).
    """

    name: str
    shape: tuple[int, ...]
    source: jax.Array | None
    transpose: bool
    index: Index | None = None

    def nbytes(self, dtype: np.dtype) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize

    def source_array(self, dtype: np.dtype) -> np.ndarray:
        """The source alone in HF layout (transposed for kernels), cast to ``dtype``."""
        x = np.asarray(jax.device_get(self.source.astype(dtype)))
        return x.T if self.transpose else x

    def array(self, dtype: np.dtype) -> np.ndarray:
        """The C-contiguous HF-layout tensor of ``shape`` in ``dtype``."""
        if self.source is None:
            return np.zeros(self.shape, dtype)
        x = self.source_array(dtype)
        if x.shape == self.shape and self.index is None:
            return np.ascontiguousarray(x)
        out = np.zeros(self.shape, dtype)
        index = self.index or tuple(slice(0, n) for n in x.shape)
        out[index] = x
        return out


def _params(model: CausalLM) -> dict[tuple, jax.Array]:
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tensors(model: CausalLM, layout: CausalLM) -> list[Tensor]:
    """Every tensor of ``layout``'s shapes, filled from ``model``'s parameters of the same path
    (kept units are a prefix, see ``surgery``); zeros where ``model`` has none."""
    params = _params(model)
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(layout, nnx.Param)):
        name, transpose = hf_name(path)
        shape = tuple(var.get_value().shape)
        tensors.append(
            Tensor(name, shape[::-1] if transpose else shape, params.get(path), transpose)
        )
    return tensors


def model_tensors(model: CausalLM) -> list[Tensor]:
    """The model's own tensors at their own shapes, in parameter order."""
    return _tensors(model, model)


def dense_tensors(model: CausalLM) -> list[Tensor]:
    """Every tensor of the dense model ``model`` was cut from, the kept units in the corner and
    every pruned unit zero."""
    return _tensors(model, decoder.abstract(dense_spec(model.spec)))


def by_name(tensors: list[Tensor]) -> dict[str, Tensor]:
    return {t.name: t for t in tensors}


# ---------------------------------------------------------------------------------------------
# safetensors files


def _write_safetensors(path: str, tensors: list[Tensor], dtype_name: str) -> None:
    """Write ``tensors`` as one safetensors file, converting and writing one tensor at a time."""
    dtype = FILE_DTYPES[dtype_name]
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
    with atomic.naming(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            f.write(t.array(dtype).reshape(-1).view(np.uint8))


def _plan_shards(tensors: list[Tensor], dtype: np.dtype, max_bytes: int) -> list[list[Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        n = t.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def write_safetensors(
    folder: str, tensors: list[Tensor], dtype_name: str, max_shard_bytes: int
) -> dict[str, Any] | None:
    """``model.safetensors``, or HF-named shards; returns the shard index to write beside them
    (``None`` for a single file)."""
    dtype = FILE_DTYPES[dtype_name]
    shards = _plan_shards(tensors, dtype, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(os.path.join(folder, SINGLE_FILE), tensors, dtype_name)
        return None
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(folder, file), shard, dtype_name)
        weight_map.update({t.name: file for t in shard})
    total = sum(t.nbytes(dtype) for t in tensors)
    return {"metadata": {"total_size": total}, "weight_map": weight_map}
