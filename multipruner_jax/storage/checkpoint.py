"""Pruned-model checkpoints: orbax params + ``spec.json`` + the tokenizer.

A checkpoint directory holds ``spec.json`` (the per-layer shapes, read first so the abstract model
can be built) and ``params/`` (an orbax ``StandardCheckpointer`` tree). It is written under a
temporary name and renamed, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.spec import ModelSpec
from multipruner_jax.base import atomic
from multipruner_jax.base.mesh import ShardingFor

DIR = "checkpoint"  # the checkpoint's name inside a prune output folder
SPEC_FILE = "spec.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# Files orbax writes last, when a save is complete.
_COMPLETE = ("_METADATA", "_CHECKPOINT_METADATA")


class CheckpointError(ValueError):
    """A directory that is not a complete checkpoint."""


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is (or claims to be) a checkpoint: it holds ``spec.json``."""
    return os.path.isfile(os.path.join(path, SPEC_FILE))


def locate(path: str) -> str:
    """``path`` when it is a checkpoint, or ``path/checkpoint`` when ``path`` is the output folder
    of a prune job; otherwise ``path`` unchanged."""
    inner = os.path.join(path, DIR)
    return inner if not is_checkpoint(path) and is_checkpoint(inner) else path


def save(path: str, model: CausalLM, extra: dict[str, Any] | None = None, tokenizer=None) -> None:
    """Save ``model`` (params, spec, optional ``extra`` JSON files and tokenizer) atomically.

    In a multi-process run every process must call this (each writes its part of the
    parameters); process 0 writes the rest.
    """
    shared = _shared(path) if jax.process_count() > 1 else None
    with atomic.directory(path, shared, incomplete=_incomplete) as tmp:
        if shared is None or shared.owner:
            atomic.write_json(tmp / SPEC_FILE, model.spec.to_dict())
            for name, obj in (extra or {}).items():
                atomic.write_json(tmp / name, obj)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        with orbax_errors(path):
            checkpointer = ocp.StandardCheckpointer()
            try:
                checkpointer.save(tmp / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model)))
                checkpointer.wait_until_finished()
            finally:
                checkpointer.close()  # also on failure: no orbax thread outlives the save


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def os_error(error: BaseException) -> OSError | None:
    """The operating-system error behind ``error``: the first ``OSError`` with an errno in its
    chain of causes, or the ``os_error_code`` that tensorstore writes into its messages."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current
        current = current.__cause__ or current.__context__
    match = _OS_ERROR_CODE.search(str(error))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def orbax_errors(where: str | os.PathLike[str]) -> Iterator[None]:
    """An orbax write whose failure is one ``OSError`` naming ``where`` (a full disk, say)
    instead of the tracebacks orbax logs from its background threads: its error records are
    dropped meanwhile (the error itself is raised), its other logs stay. When one write fails,
    tensorstore's other writes still finish on their own threads, some after the error is
    raised: their ``Event loop is closed`` tracebacks, asyncio's reports of failed tasks and its
    warnings of coroutines never awaited are dropped for the rest of the process."""
    absl_logger = logging.getLogger("absl")
    asyncio_logger = logging.getLogger("asyncio")
    stderr = sys.stderr
    absl_logger.addFilter(_below_error)
    asyncio_logger.addFilter(_not_late_task_log)
    sys.stderr = _LateTracebackFilter(stderr)

    def restore() -> None:
        sys.stderr = stderr
        absl_logger.removeFilter(_below_error)
        asyncio_logger.removeFilter(_not_late_task_log)

    try:
        yield
    except Exception as error:
        cause = os_error(error)
        if cause is None:
            restore()
            raise
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        raise OSError(cause.errno, cause.strerror, str(where)) from None
    restore()


_LATE_TRACEBACK_END = "RuntimeError: Event loop is closed"
_LATE_LOG = "exception was never retrieved"  # asyncio's words for a failed Task or Future


def _not_late_task_log(record: logging.LogRecord) -> bool:
    """Not asyncio's report of a failed write's task, collected after the error was raised."""
    return _LATE_LOG not in record.getMessage()


class _LateTracebackFilter:
    """A text stream that passes everything to ``stream`` except tracebacks (collected per
    thread, from their first line to the exception line) that end in ``_LATE_TRACEBACK_END``:
    tensorstore's callbacks print those when they find orbax's event loop already closed."""

    def __init__(self, stream):
        self._stream = stream
        self._held = threading.local()

    def write(self, text: str) -> int:
        held = getattr(self._held, "text", None)
        if held is None and not text.startswith("Traceback (most recent call last)"):
            return self._stream.write(text)
        held = (held or "") + text
        lines = held.splitlines(keepends=True)
        end = next(
            (i for i, line in enumerate(lines[1:], 1) if line.endswith("\n") and line[:1].strip()),
            None,
        )
        if end is None:
            self._held.text = held
            return len(text)
        self._held.text = None
        if lines[end].strip() != _LATE_TRACEBACK_END:
            self._stream.write("".join(lines[: end + 1]))
        rest = "".join(lines[end + 1 :])
        if rest:
            self.write(rest)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _incomplete(folder: Path) -> str | None:
    """What a freshly written checkpoint ``folder`` lacks (``None``: it is complete)."""
    needed = [SPEC_FILE, *(f"{PARAMS_DIR}/{name}" for name in _COMPLETE)]
    missing = [name for name in needed if not (folder / name).is_file()]
    return f"{', '.join(missing)} missing" if missing else None


def _shared(path: str) -> atomic.Shared:
    """One temporary checkpoint directory for all processes, named by process 0."""
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.uint32))
    return atomic.Shared(
        token=f"{int(token[0]):08x}",
        owner=jax.process_index() == 0,
        sync=lambda: multihost_utils.sync_global_devices(f"checkpoint {path}"),
    )


def load_spec(path: str) -> ModelSpec:
    """The spec of checkpoint ``path``, after checking the checkpoint is complete."""
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a checkpoint (no {SPEC_FILE}); expected the {DIR}/ folder that "
            "prune.py writes, or its output folder"
        )
    params = os.path.join(path, PARAMS_DIR)
    missing = [f for f in _COMPLETE if not os.path.isfile(os.path.join(params, f))]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete checkpoint ({PARAMS_DIR}/ lacks {', '.join(missing)}: the "
            "write that made it was interrupted); write it again, e.g. prune.py --resume"
        )
    try:
        with open(os.path.join(path, SPEC_FILE), encoding="utf-8") as f:
            return ModelSpec.from_dict(json.load(f))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path}/{SPEC_FILE} is damaged ({error!r})") from None


def restore(
    path: str,
    dtype: jnp.dtype | None = None,
    sharding_for: ShardingFor | None = None,
) -> CausalLM:
    """Load a checkpoint written by ``save``; ``dtype`` casts (default: as saved)."""
    path = os.path.abspath(path)
    spec = load_spec(path)
    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(os.path.join(path, PARAMS_DIR)).item_metadata
    except Exception as error:
        checkpointer.close()
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({error!r})") from None
    saved_dtype = jax.tree.leaves(meta)[0].dtype
    graphdef, abstract_state = nnx.split(decoder.abstract(spec, saved_dtype))
    device = jax.devices()[0]

    def target(keypath, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath)
        sharding = (
            sharding_for(name, leaf.shape)
            if sharding_for
            else jax.sharding.SingleDeviceSharding(device)
        )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    abstract = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract_state))
    try:
        restored = checkpointer.restore(os.path.join(path, PARAMS_DIR), abstract)
    except Exception as error:  # orbax/tensorstore raise many types for missing or bad data
        raise CheckpointError(
            f"{path}: the parameters cannot be read ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}); the checkpoint is damaged"
        ) from None
    finally:
        checkpointer.close()
    if dtype is not None:
        restored = jax.tree.map(lambda x: x.astype(dtype), restored)
        graphdef, abstract_state = nnx.split(decoder.abstract(spec, dtype))
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
