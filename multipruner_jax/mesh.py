"""Device mesh ("data", "model"); shardings of rows, activations and parameters; multi-host."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Where to place each parameter: (our dotted path, e.g. "model.layers.3.mlp.up_proj.kernel",
# shape) -> sharding. Loaders, surgery and checkpoints take one.
ShardingFor = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]

# Parameters split over "model": (path suffix, axis of the [in, out] kernel that holds heads or
# channels). Everything else is replicated.
_MODEL_AXIS = {
    "q_proj.kernel": 1,
    "k_proj.kernel": 1,
    "v_proj.kernel": 1,
    "q_proj.bias": 0,
    "k_proj.bias": 0,
    "v_proj.bias": 0,
    "o_proj.kernel": 0,
    "gate_proj.kernel": 1,
    "up_proj.kernel": 1,
    "down_proj.kernel": 0,
}


def parse_mesh_shape(text: str) -> tuple[int, int] | None:
    """``"4,2"`` -> ``(4, 2)`` (data, model); ``""`` -> ``None`` (all devices on "data")."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--mesh_shape={text!r}: expected two positive integers 'data,model'")
    return int(parts[0]), int(parts[1])


def make_mesh(shape: tuple[int, int] | None = None) -> Mesh:
    """A ``Mesh`` with Auto axes ``("data", "model")`` over the first ``data*model`` devices
    (default: all devices on "data")."""
    devices = jax.devices()
    if shape is None:
        shape = (len(devices), 1)
    if math.prod(shape) > len(devices):
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape)} devices; {len(devices)} are available"
        )
    grid = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (axis 0) on "data", the rest replicated: tokens ``[B, T]``, activations ``[B, T, D]``"""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, path: str, shape: tuple[int, ...]) -> NamedSharding:
    """Heads and MLP channels on "model" when the axis divides evenly; otherwise replicated."""
    model_size = mesh.shape["model"]
    for suffix, axis in _MODEL_AXIS.items():
        if path.endswith(suffix) and model_size > 1 and shape[axis] % model_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "model"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def initialize_distributed() -> None:
    """Join a multi-host run (Cloud TPU pods): call before any other JAX work."""
    jax.distributed.initialize()
