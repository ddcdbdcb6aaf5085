"""Pruned-model checkpoints (orbax params + ``spec.json``) and atomic JSON files.

A checkpoint directory holds ``spec.json`` (the per-layer shapes, read first so the abstract model
can be built) and ``params/`` (an orbax ``StandardCheckpointer`` tree). It is written under a
temporary name and renamed, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from models import decoder
from models.decoder import CausalLM
from models.spec import ModelSpec

SPEC_FILE = "spec.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1))


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPEC_FILE)) and os.path.isdir(
        os.path.join(path, PARAMS_DIR)
    )


def save(path: str, model: CausalLM, extra: dict[str, Any] | None = None, tokenizer=None) -> None:
    """Save ``model`` (params, spec, optional ``extra`` JSON files and tokenizer) atomically."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        write_json(os.path.join(tmp, SPEC_FILE), model.spec.to_dict())
        for name, obj in (extra or {}).items():
            write_json(os.path.join(tmp, name), obj)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model)))
        checkpointer.wait_until_finished()
        checkpointer.close()
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_spec(path: str) -> ModelSpec:
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected {SPEC_FILE} and {PARAMS_DIR}/)"
        )
    with open(os.path.join(path, SPEC_FILE)) as f:
        return ModelSpec.from_dict(json.load(f))


def restore(
    path: str,
    dtype: jnp.dtype | None = None,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
) -> CausalLM:
    """Load a checkpoint written by ``save``; ``dtype`` casts (default: as saved)."""
    path = os.path.abspath(path)
    spec = load_spec(path)
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(os.path.join(path, PARAMS_DIR)).item_metadata
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
    restored = checkpointer.restore(os.path.join(path, PARAMS_DIR), abstract)
    checkpointer.close()
    if dtype is not None:
        restored = jax.tree.map(lambda x: x.astype(dtype), restored)
        graphdef, abstract_state = nnx.split(decoder.abstract(spec, dtype))
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
