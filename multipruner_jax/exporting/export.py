"""Export a pruned ``CausalLM``: one table of formats (``FORMATS``), one writer each.

Four formats. ``decilm`` (vLLM, SGLang, TensorRT-LLM, mlx-lm) and ``gguf`` (llama.cpp, Ollama,
LM Studio) are the serving formats, described in ``decilm`` and ``gguf_export``; each export
reports in one line which zeros its schema forced on it (``padding``). The two Hugging Face
layouts below both have the *unchanged dense* ``config.json`` (written here from the spec) and
HF tensor names and layout (linear weights ``[out, in]``; ``lm_head.weight`` only when untied):

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

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.decoder import CausalLM
from models.spec import (
    SUPPORTED_MODEL_TYPES,
    ModelSpec,
    count_params,
    dense_spec,
    spec_to_hf_config,
)
from multipruner_jax.base import atomic
from multipruner_jax.exporting import decilm, gguf_export
from multipruner_jax.exporting.padding import Padding
from multipruner_jax.exporting.tensor_files import (
    FILE_DTYPES,
    Tensor,
    dense_tensors,
    model_tensors,
    write_safetensors,
)
from multipruner_jax.storage import checkpoint, hf_io, pruning_config, remote_code

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

log = logging.getLogger(__name__)


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
# The formats


@dataclass(frozen=True)
class Job:
    """What a format writer gets: the model and the export options."""

    model: CausalLM
    dtype: str
    max_shard_bytes: int
    tokenizer: Any
    pruning_config: dict[str, Any] | None


def _write_hf(folder: str, job: Job, tensors: list[Tensor], config_json: dict[str, Any]) -> None:
    _save_tokenizer(folder, job.tokenizer)
    index = write_safetensors(folder, tensors, job.dtype, job.max_shard_bytes)
    if index is not None:
        atomic.write_json(os.path.join(folder, hf_io.INDEX_FILE), index)
    atomic.write_json(os.path.join(folder, hf_io.CONFIG_FILE), config_json)


def _write_padded(job: Job, folder: str) -> Padding:
    spec = job.model.spec
    _write_hf(folder, job, dense_tensors(job.model), spec_to_hf_config(spec, job.dtype))
    padding = Padding()
    zeros = count_params(dense_spec(spec)) - count_params(spec)
    padding.add(None, "every pruned unit as zeros (dense shapes)", zeros)
    return padding


def _write_compact(job: Job, folder: str) -> Padding:
    spec = job.model.spec
    config_json = spec_to_hf_config(spec, job.dtype)
    config_json.update(remote_code.config_additions(spec))
    _write_hf(folder, job, model_tensors(job.model), config_json)
    shutil.copy(remote_code.MODELING_FILE, folder)
    atomic.write_json(
        os.path.join(folder, pruning_config.FILE),
        _compact_pruning_config(spec, job.pruning_config),
    )
    return Padding()


def _warn_window(spec: ModelSpec, fmt: str) -> None:
    """The serving schemas carry no sliding window."""
    if spec.sliding_window is not None:
        log.warning(
            "%s engines attend over the whole context: outputs equal the pruned model's only "
            "within its sliding window of %d tokens",
            fmt,
            spec.sliding_window,
        )


def _write_decilm(job: Job, folder: str) -> Padding:
    spec = job.model.spec
    _warn_window(spec, "decilm")
    if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
        log.warning(
            "head_dim %d is not hidden_size / num_attention_heads: mlx-lm's DeciLM model assumes "
            "it is and will fail to load this export (vLLM reads head_dim)",
            spec.head_dim,
        )
    tensors, padding = decilm.tensors(job.model)
    _write_hf(folder, job, tensors, decilm.config(spec, job.dtype))
    for file in (remote_code.MODELING_FILE, *decilm.FILES):
        shutil.copy(file, folder)
    return padding


def _write_gguf(job: Job, folder: str) -> Padding:
    _warn_window(job.model.spec, "gguf")
    return gguf_export.write(job.model, folder, job.dtype, job.tokenizer)


@dataclass(frozen=True)
class Format:
    """One export format: its writer, what it can carry, and what it is for."""

    write: Callable[[Job, str], Padding]
    families: tuple[str, ...]
    dtypes: tuple[str, ...]
    summary: str


_HF_DTYPES = tuple(FILE_DTYPES)
_ALL_FAMILIES = SUPPORTED_MODEL_TYPES
# The one table of export formats: adding a format means adding an entry here.
FORMATS: dict[str, Format] = {
    "compact": Format(
        _write_compact,
        _ALL_FAMILIES,
        _HF_DTYPES,
        "pruned shapes, transformers with trust_remote_code=True (exact)",
    ),
    "padded": Format(
        _write_padded,
        _ALL_FAMILIES,
        _HF_DTYPES,
        "dense shapes with pruned units zero, any loader of the family (dense size and speed)",
    ),
    "decilm": Format(
        _write_decilm,
        decilm.FAMILIES,
        _HF_DTYPES,
        "DeciLM/Nemotron-NAS schema for vLLM, SGLang, TensorRT-LLM and mlx-lm (pruned size; "
        "query heads padded)",
    ),
    "gguf": Format(
        _write_gguf,
        gguf_export.FAMILIES,
        gguf_export.DTYPES,
        "one GGUF file (arch deci) for llama.cpp, Ollama and LM Studio (exact pruned shapes)",
    ),
}
DTYPES = tuple(dict.fromkeys(d for f in FORMATS.values() for d in f.dtypes))


def check_format(fmt: str, dtype: str, model_type: str, flag: str = "--format") -> None:
    """Raise ``ValueError`` (one sentence) unless ``fmt`` can write a ``model_type`` model in
    ``dtype``."""
    if fmt not in FORMATS:
        raise ValueError(f"{flag}={fmt!r}: expected one of {', '.join(FORMATS)}")
    entry = FORMATS[fmt]
    if dtype not in entry.dtypes:
        raise ValueError(
            f"the {fmt} format cannot write dtype {dtype!r}; it takes {', '.join(entry.dtypes)}"
        )
    if model_type not in entry.families:
        others = " or ".join(name for name, f in FORMATS.items() if model_type in f.families)
        why = _WHY_NOT.get(model_type, f"its engines do not implement {model_type}")
        raise ValueError(
            f"the {fmt} format cannot carry a {model_type} model ({why}); export it with "
            f"--format={others}"
        )


_WHY_NOT = {"qwen3": "no engine's DeciLM or deci code has Qwen3's q/k norm"}


# ---------------------------------------------------------------------------------------------
# Public API


def _check_options(fmt: str, dtype: str, max_shard_bytes: int, model_type: str) -> None:
    check_format(fmt, dtype, model_type)
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
) -> str:
    """Write ``model`` to the folder ``out`` in format ``fmt`` (see ``FORMATS``).

    Args:
      model: a (pruned) model; any parameter dtype.
      out: output directory; must be absent or empty unless ``overwrite``.
      fmt: a key of ``FORMATS``.
      dtype: the tensors' dtype in the files (the format's ``dtypes``).
      max_shard_bytes: safetensors formats: above this many tensor bytes, shards plus an index.
      tokenizer: a tokenizer directory to copy, or an object with ``save_pretrained``.
      config: ``compact`` only: the search's pruning config (keeps its removal order and
        ``weight_reorder``); default: removals in layer order.
      overwrite: replace a non-empty ``out``.

    Returns the one-line padding report (what the format had to write as zeros, and where).
    """
    spec = model.spec
    _check_options(fmt, dtype, max_shard_bytes, spec.model_type)
    if config is not None and fmt != "compact":
        raise ValueError("a pruning config is only written with the compact format")
    check_output(out, overwrite)
    job = Job(model, dtype, max_shard_bytes, tokenizer, config)
    with atomic.directory(out) as tmp:
        padding = FORMATS[fmt].write(job, str(tmp))
    return padding.line(fmt, count_params(spec))


def export_checkpoint(
    path: str,
    out: str,
    *,
    fmt: str = "compact",
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> str:
    """Export our pruned checkpoint ``path`` (``checkpoint.save``) with its ``tokenizer/``.

    ``compact`` takes the removal order from a ``pruning_config.json`` in ``path`` or its parent
    (where the prune job writes it) when that file matches the checkpoint's shapes. Nothing is
    written when ``path`` is not a checkpoint, the format cannot carry it, or ``out`` is in the
    way. Returns ``export``'s padding report.
    """
    path = checkpoint.locate(path)
    spec = checkpoint.load_spec(path)
    _check_options(fmt, dtype, max_shard_bytes, spec.model_type)
    check_output(out, overwrite, source=path)
    tokenizer = os.path.join(path, checkpoint.TOKENIZER_DIR)
    return export(
        checkpoint.restore(path),
        out,
        fmt=fmt,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        tokenizer=tokenizer if os.path.isdir(tokenizer) else None,
        config=_checkpoint_pruning_config(path, spec) if fmt == "compact" else None,
        overwrite=overwrite,
    )
