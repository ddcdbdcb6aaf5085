"""Read a Hugging Face model directory (``config.json`` + safetensors) into a ``CausalLM``.

This is the only reader of HF directories: dense checkpoints, and ``compact`` exports whose
``pruning_config.json`` gives the per-layer shapes (``export`` is the only writer).

Tensors are read lazily, one at a time, straight onto their target sharding: each device's shard
is cut from the memory-mapped file with ``get_slice``, so the host never holds more than about one
tensor beyond the parameters already placed, and never a second copy of the model.

HF stores linear weights ``[out, in]``; our kernels are ``[in, out]``, so kernels (``*.kernel``,
``lm_head.kernel``) are transposed on load and every other tensor is copied as is. All shapes and
names are checked against the spec from headers alone, before any weight is read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from models import decoder
from models.decoder import CausalLM
from models.hf_names import hf_name
from models.spec import ModelSpec, load_hf_config
from multipruner_jax.base.mesh import ShardingFor
from multipruner_jax.storage import pruning_config, remote_code

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # of parameters and compute


class WeightsError(ValueError):
    """An HF directory whose weights cannot be read into the model its spec describes."""


@dataclass(frozen=True)
class _Target:
    """One parameter to fill: our path and shape, its HF tensor name and layout."""

    path: tuple[str | int, ...]
    shape: tuple[int, ...]
    hf_name: str
    transpose: bool

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape


def read_dense_spec(path: str) -> ModelSpec:
    """The dense ``ModelSpec`` of the HF directory ``path`` (its ``config.json`` alone)."""
    return load_hf_config(os.path.join(path, CONFIG_FILE))


def read_spec(path: str) -> ModelSpec:
    """The spec of HF directory ``path``: its dense ``config.json`` with ``pruning_config.json``
    applied when present (a ``compact`` export)."""
    spec = read_dense_spec(path)
    config_file = os.path.join(path, pruning_config.FILE)
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        layers = json.load(f).get(remote_code.LAYERS_KEY)
    if os.path.isfile(config_file):
        spec = pruning_config.to_spec(spec, pruning_config.load(config_file))
        if layers is not None:
            ours = remote_code.config_additions(spec)[remote_code.LAYERS_KEY]
            differ = [i for i, (a, b) in enumerate(zip(ours, layers, strict=False)) if a != b]
            if differ or len(ours) != len(layers):
                first = differ[0] if differ else min(len(ours), len(layers))
                raise WeightsError(
                    f"{path}: {pruning_config.FILE} and {CONFIG_FILE}'s "
                    f"{remote_code.LAYERS_KEY} describe different models (first at layer "
                    f"{first}); expected a compact export whose two descriptions agree"
                )
    elif layers is not None:
        raise WeightsError(
            f"{path}: {CONFIG_FILE} lists {remote_code.LAYERS_KEY} (a compact export) but "
            f"{pruning_config.FILE} is missing; expected both, as export_hf.py writes them"
        )
    return spec


def load_model(
    path: str,
    dtype: jnp.dtype = jnp.float32,
    sharding_for: ShardingFor | None = None,
    spec: ModelSpec | None = None,
) -> CausalLM:
    """Load the HF directory ``path`` into a ``CausalLM`` of ``dtype`` (float32 or bfloat16).

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded
        ``model.safetensors.index.json``.
      dtype: parameter dtype; tensors are cast on load.
      sharding_for: ``(param_path, shape) -> Sharding`` for each parameter, where ``param_path``
        is like ``"model.layers.3.self_attn.q_proj.kernel"`` and ``shape`` is our (``[in, out]``)
        shape. Default: the first device.
      spec: the shapes to load; default: ``read_spec(path)`` (dense, or a compact export's).
        Tensors of blocks the spec removed are not read, so they may be absent from the files.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in map(jnp.dtype, COMPUTE_DTYPES.values()):
        raise ValueError(f"dtype {dtype} is not supported; expected float32 or bfloat16")
    spec = read_spec(path) if spec is None else spec
    files = _weight_files(path)
    graphdef, state = nnx.split(decoder.abstract(spec, dtype))
    flat = nnx.to_flat_state(state)
    targets = [_target(p, v.get_value().shape) for p, v in flat]
    sharding_for = sharding_for or _first_device
    _check_all_used(path, spec, targets, files)
    with _open_all(files) as handles:
        _check_headers(targets, files, handles)
        values = [
            _read(handles[files[t.hf_name]], t, dtype, sharding_for(t.name, t.shape))
            for t in targets
        ]
    filled = [(p, v.replace(x)) for (p, v), x in zip(flat, values, strict=True)]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _first_device(_name: str, _shape: tuple[int, ...]) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _target(path: tuple[str | int, ...], shape: tuple[int, ...]) -> _Target:
    name, transpose = hf_name(path)
    return _Target(tuple(path), tuple(shape), name, transpose)


def _weight_files(path: str) -> dict[str, str]:
    """``{tensor name: file path}`` from the index, or from the single file's header."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e!r})") from None
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        with _open_all({"": single}) as handles:
            return {name: single for name in handles[single].keys()}
    raise WeightsError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


@contextlib.contextmanager
def _open_all(files: dict[str, str]) -> Iterator[dict[str, object]]:
    """Open every distinct file of ``files`` (headers only); a bad file is named in the error."""
    with contextlib.ExitStack() as stack:
        handles = {}
        for file in sorted(set(files.values())):
            try:
                handles[file] = stack.enter_context(safe_open(file, framework="numpy"))
            except (OSError, SafetensorError) as e:
                raise WeightsError(f"{file}: cannot read safetensors file ({e})") from None
        yield handles


def _check_all_used(
    path: str, spec: ModelSpec, targets: list[_Target], files: dict[str, str]
) -> None:
    """Every tensor of the files is a parameter of ``spec`` (a tensor nothing reads means the
    config describes another model than the weights). Rotary caches, and an LM head saved
    beside tied embeddings, are the exceptions."""
    used = {t.hf_name for t in targets}
    unused = sorted(
        name
        for name in files
        if name not in used
        and not name.endswith("rotary_emb.inv_freq")
        and not (name == "lm_head.weight" and spec.tie_word_embeddings)
    )
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        raise WeightsError(
            f"{path}: {len(unused)} tensors are not parameters of the model its config describes "
            f"({shown}); expected weights that match {CONFIG_FILE} (and {pruning_config.FILE})"
        )


def _check_headers(targets: list[_Target], files: dict[str, str], handles: dict) -> None:
    """Every target tensor exists with the shape the spec implies (headers only, no data)."""
    for t in targets:
        if t.hf_name not in files:
            raise WeightsError(f"tensor {t.hf_name} is missing from the checkpoint")
        file = files[t.hf_name]
        try:
            shape = tuple(handles[file].get_slice(t.hf_name).get_shape())
        except SafetensorError as e:
            raise WeightsError(f"{file}: cannot read tensor {t.hf_name} ({e})") from None
        if shape != t.hf_shape:
            raise WeightsError(
                f"tensor {t.hf_name} in {file} has shape {shape} but the config implies "
                f"{t.hf_shape}"
            )


def _read(handle, t: _Target, dtype: jnp.dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place tensor ``t`` onto ``sharding``, reading only each device's slice of the file."""
    tensor = handle.get_slice(t.hf_name)
    cache: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, t.shape, strict=True))
        if key not in cache:
            hf_index = index[::-1] if t.transpose else index
            x = tensor[hf_index]
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise WeightsError(
                    f"tensor {t.hf_name} holds non-finite values (inf or NaN); expected finite "
                    "weights"
                )
            cache[key] = (x.T if t.transpose else x).astype(dtype)
        return cache[key]

    return jax.make_array_from_callback(t.shape, sharding, shard, dtype=dtype)
