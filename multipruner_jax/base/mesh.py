"""Device mesh ("candidate", "data", "model"); shardings of rows, activations and parameters;
multi-process runs.

Candidates of one search step are scored side by side on the "candidate" axis (each candidate
group of devices holds a full copy of the model), rows are split over "data", heads and MLP
channels over "model". A two-number shape ``data,model`` means one candidate group.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("candidate", "data", "model")
_JAX_GRACE_S = 30  # JAX's own join timeout is this much later than ours, so ours reports first

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


def parse_mesh_shape(text: str, candidates: bool = True) -> tuple[int, int, int] | None:
    """``"4,2"`` -> ``(1, 4, 2)``; ``"2,4,1"`` -> ``(2, 4, 1)`` (candidate, data, model);
    ``""`` -> ``None`` (all devices on "data"). Without ``candidates`` (jobs that score one
    model at a time) a candidate axis above 1 is refused."""
    if not text:
        return None
    parts = text.split(",")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"--mesh_shape={text!r}: expected two or three positive integers 'data,model' or "
            "'candidate,data,model'"
        )
    shape = _full_shape(tuple(int(p) for p in parts))
    if shape[0] > 1 and not candidates:
        raise ValueError(
            f"--mesh_shape={text!r}: only the search has a candidate axis; expected 'data,model'"
        )
    return shape


def _full_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def check_batch_size(flag: str, batch_size: int, data_axis: int, *, zero: bool = False) -> None:
    """``batch_size`` rows must split evenly over a data axis of ``data_axis`` devices; with
    ``zero``, 0 is also accepted (it means one row per device)."""
    if batch_size < 0 or (batch_size == 0 and not zero) or batch_size % data_axis:
        either = "0 (one row per device) or " if zero else ""
        raise ValueError(
            f"{flag}={batch_size}: expected {either}a positive multiple of the mesh's data axis "
            f"({data_axis} devices)"
        )


def make_mesh(shape: tuple[int, ...] | None = None) -> Mesh:
    """A ``Mesh`` with Auto axes ``("candidate", "data", "model")`` over the first
    ``candidate*data*model`` devices; ``shape`` is ``(data, model)`` or
    ``(candidate, data, model)`` (default: all devices on "data")."""
    devices = jax.devices()
    shape = (1, len(devices), 1) if shape is None else _full_shape(tuple(shape))
    if math.prod(shape) > len(devices):
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape)} devices; {len(devices)} are available"
        )
    if jax.process_count() > 1 and math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {shape} uses {math.prod(shape)} of the {len(devices)} devices of a "
            f"{jax.process_count()}-process run; expected a mesh over all of them (every "
            "process must hold its part of the mesh)"
        )
    grid = np.asarray(devices[: math.prod(shape)]).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


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


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """``value`` (the same on every process) placed on ``sharding``; each process fills only its
    own devices, so this works when the sharding spans processes."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of ``x`` as numpy on this process, also when ``x`` spans processes."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 120,
) -> None:
    """Join a multi-process run (a Cloud TPU VM slice, a multi-GPU host, or local CPU processes);
    call before any other JAX work.

    Without a coordinator address JAX detects the cluster (Cloud TPU, SLURM, ...). CPU devices
    use Gloo collectives. Raises ``ValueError`` (one sentence) when no coordinator is given or
    detected, when the address has no port, or when a process other than 0 cannot reach it
    within ``timeout_s`` seconds. When the processes have not all joined after ``timeout_s``
    seconds, this process prints one ``error:`` sentence and exits with status 1 (JAX itself
    would abort with a C++ stack). Later, every process fails within about ``timeout_s``
    seconds when another one stops answering (JAX ends the process with "the JAX distributed
    service detected fatal errors").

    Once joined, SIGTERM ends this process at once (JAX's preemption notifier would otherwise
    take the signal and keep the process running).
    """
    if timeout_s <= 0:
        raise ValueError(f"--coordinator_timeout={timeout_s}: expected a positive count of seconds")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: expected a positive count")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        expected = f"0 to {num_processes - 1}" if num_processes else "at least 0"
        raise ValueError(f"--process_id={process_id}: expected {expected}")
    if coordinator_address:
        _host_port(coordinator_address)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address and process_id:
        _wait_for_coordinator(coordinator_address, timeout_s)
    where = f"at {coordinator_address} " if coordinator_address else ""
    watchdog = threading.Timer(
        timeout_s,
        _exit_with,
        (
            f"--distributed: the run {where}was not complete after --coordinator_timeout="
            f"{timeout_s} s (process {process_id} of {num_processes} waited for the others); "
            "start every process, with the same --num_processes and --coordinator_address",
        ),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s + _JAX_GRACE_S,
            heartbeat_timeout_seconds=timeout_s,
            shutdown_timeout_seconds=timeout_s,
        )
    except (ValueError, RuntimeError) as e:
        watchdog.cancel()
        reason = " ".join(str(e).split()) or type(e).__name__
        if coordinator_address:
            raise ValueError(
                f"--distributed: could not join the run at {coordinator_address} as process "
                f"{process_id} of {num_processes} ({reason})"
            ) from None
        raise ValueError(
            "--distributed: no coordinator was given or detected; pass "
            "--coordinator_address=host:port, --num_processes and --process_id, or run on a "
            f"Cloud TPU VM slice ({reason})"
        ) from None
    watchdog.cancel()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_with(message: str) -> None:
    """Print ``error: message`` and end the process at once (from any thread)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r}: expected host:port")
    return host, int(port)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Return once ``host:port`` accepts a TCP connection; ``ValueError`` after ``timeout_s``."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"--distributed: the coordinator at {address} could not be reached within "
                    f"{timeout_s} s ({e.strerror or e}); start process 0 there first, or check "
                    "--coordinator_address"
                ) from None
        time.sleep(0.5)


@contextlib.contextmanager
def leave_on_error() -> Iterator[None]:
    """In a multi-process run, end this process at once (exit status 1) when the block raises,
    after printing the error (one line for ``ValueError``/``OSError``, else the traceback).

    Otherwise it would wait for the other processes at JAX's shutdown barrier while they wait
    for it in a collective; they fail once the coordinator misses this process (about
    ``timeout_s`` of ``initialize_distributed``). In a single process this does nothing.
    """
    try:
        yield
    except BaseException as error:
        if not jax.distributed.is_initialized():
            raise
        where = f"process {jax.process_index()} of {jax.process_count()}"
        if isinstance(error, (ValueError, OSError)):
            print(f"error ({where}): {' '.join(str(error).split())}", file=sys.stderr)
        else:
            print(f"error ({where}):", file=sys.stderr)
            traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
