"""Every process of a multi-process run must run the same job: compare options right after joining.

A worker started with one different flag would take other decisions than process 0 (or score
on a mix of both processes' rows) and then wait forever in a collective. ``check_same_options``
runs two small collectives right after ``jax.distributed`` joins: process 0 broadcasts a hash of
each of its options, every process finds the first option whose hash differs from its own, and
all processes gather those findings. Any difference fails every process at once with the same
sentence naming the flag.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import numpy as np

from multipruner_jax.storage import model_source

_PATHS = ("output_path", "cache_dir", "export_hf", "pruned_model_config_file")
_SOURCES = ("model_path", "calibration_dataset", "eval_dataset", "data")


def resolved(options: Any) -> dict[str, Any]:
    """The dataclass ``options`` with local paths made absolute (links resolved): what a run
    actually reads and writes, whatever the working directory it was started in."""
    values = dataclasses.asdict(options)
    for name, value in values.items():
        if isinstance(value, str) and value:
            if name in _PATHS:
                values[name] = os.path.realpath(value)
            elif name in _SOURCES:
                values[name] = model_source.canonical(value)
    return values


def option_hashes(values: dict[str, Any]) -> np.ndarray:
    """One 32-bit hash per option, in order: ``uint32[len(values)]``."""
    digests = [
        hashlib.sha256(f"{name}={value!r}".encode()).digest()[:4] for name, value in values.items()
    ]
    return np.frombuffer(b"".join(digests), dtype=np.uint32).copy()


def first_difference(mine: np.ndarray, theirs: np.ndarray) -> int:
    """The index of the first differing hash, or -1."""
    if mine.shape != theirs.shape:
        return 0
    differ = np.flatnonzero(mine != theirs)
    return int(differ[0]) if differ.size else -1


def check_same_options(options: Any) -> None:
    """In a multi-process run, raise ``ValueError`` in every process unless all processes were
    given the same options as process 0 (one sentence naming the first differing flag)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    values = resolved(options)
    names = list(values)
    mine = option_hashes(values)
    theirs = np.asarray(multihost_utils.broadcast_one_to_all(mine)).astype(np.uint32)
    found = np.asarray([first_difference(mine, theirs)], dtype=np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(found)).reshape(-1)
    differing = [(int(index), process) for process, index in enumerate(everyone) if index >= 0]
    if not differing:
        return
    index, process = min(differing)
    name = names[index]
    mine_too = index == int(found[0])
    here = f" (here: --{name}={values[name]!r})" if mine_too else ""
    raise ValueError(
        f"--{name} differs between process 0 and process {process} of {jax.process_count()}; "
        f"every process must be started with the same options{here}"
    )
