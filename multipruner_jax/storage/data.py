"""Calibration and evaluation text -> token windows, following the reference protocol exactly.

The reference (MultiPruner ``run_multipruner.py`` with BlockPruner's ``utils.py``) builds a pool
of text records, draws two subsets with Python's ``random`` seeded with 42 (first the width set,
then, independently, the block set), and turns each subset into windows the way WikiText-2
perplexity is computed: the records are joined with ``"\\n\\n"``, tokenized once as one string with
the tokenizer's default special tokens, truncated to a multiple of ``seqlen`` and cut into
non-overlapping rows.

A source is a named dataset loaded with ``datasets`` (``alpaca``, ``wikitext2``, ``c4``, ``ptb``) or
a local path: a ``.txt`` file or a folder of them (records are paragraphs separated by blank lines),
a ``.jsonl`` file or a ``.json`` list of objects (a ``text`` field, or Alpaca
``instruction``/``input``/``output`` fields rendered with the Alpaca prompt), or a ``datasets``
``save_to_disk`` folder. Local files are read by ``records.py`` (with its errors naming the file and
line); this module turns their records into the pool's texts. Windows can be cached as ``.npy``
files keyed by everything that determines them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from multipruner_jax.base import atomic
from multipruner_jax.storage import assets, records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMED_SOURCES = ("alpaca", "wikitext2", "c4", "ptb")
WIKITEXT2_ENV = "MULTIPRUNER_WIKITEXT2"
# sha256 of "\n\n".join(rows) for the 4,358-row wikitext-2-raw-v1 test split (1,294,336 chars).
WIKITEXT2_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)

_CACHE_VERSION = 2  # 2: keyed by the tokenizer's and the text files' content
_ACCEPTED = (
    f"one of {', '.join(NAMED_SOURCES)}, or a path to a .txt file, a folder of .txt files, a "
    ".jsonl file or .json list (a 'text' field or Alpaca 'instruction'/'input'/'output' fields) "
    "or a datasets save_to_disk folder"
)
# The kinds of local source (``records.KINDS``) that calibration and evaluation read.
_LOCAL_KINDS = ("txt", "txt_dir", "jsonl", "json", "arrow")
_log = logging.getLogger(__name__)


def tokenize_windows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, seqlen: int
) -> np.ndarray:
    """Join ``texts`` with blank lines, tokenize once and cut into rows: ``int32[rows, seqlen]``.

    The tokenizer adds its default special tokens (one BOS at the very start for tokenizers that
    add one); the tail that does not fill a whole row is dropped.
    """
    ids = tokenizer("\n\n".join(texts), verbose=False)["input_ids"]
    rows = len(ids) // seqlen
    if rows == 0:
        raise ValueError(
            f"the texts give {len(ids)} tokens, but one window needs {seqlen} (seqlen={seqlen})"
        )
    return np.asarray(ids[: rows * seqlen], dtype=np.int32).reshape(rows, seqlen)


def calibration_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seqlen: int = 2048,
    num_width: int = 128,
    num_block: int = 256,
    seed: int = 42,
    cache_dir: str | None = None,
    *,
    wikitext2_path: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Width and block calibration windows of ``source``, as the reference builds them.

    Args:
        source: a name in ``NAMED_SOURCES`` or a local path (see the module docstring).
        tokenizer: the model's tokenizer.
        seqlen: tokens per window.
        num_width: records drawn for the width (MLP channel / attention head) stages.
        num_block: records drawn, after the width set, for the block stage.
        seed: seed of the ``random.Random`` that draws both subsets.
        cache_dir: folder for cached windows; ``None`` disables caching.
        wikitext2_path: a local ``wiki.test.rows.jsonl`` for ``source="wikitext2"``.

    Returns:
        ``(width_tokens, block_tokens)``: ``int32[width_rows, seqlen]``, ``int32[block_rows,
        seqlen]``.
    """
    key = {
        "kind": "calibration",
        "source": _source_identity(source, wikitext2_path),
        "tokenizer": _tokenizer_identity(tokenizer),
        "seqlen": seqlen,
        "num_width": num_width,
        "num_block": num_block,
        "seed": seed,
    }

    def build() -> tuple[np.ndarray, np.ndarray]:
        records = load_records(source, wikitext2_path=wikitext2_path)
        if source == "wikitext2":
            _log.warning("calibrating on the WikiText-2 test split, which is also the PPL set")
        subsets = sample_calibration_texts(records, num_width, num_block, seed, source)
        return tuple(
            _windows_of(texts, tokenizer, seqlen, f"{source!r} {role} set of {len(texts)} records")
            for role, texts in zip(("width", "block"), subsets, strict=True)
        )

    return _cached(cache_dir, key, ("width", "block"), build)


def evaluation_windows(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    seqlen: int = 2048,
    cache_dir: str | None = None,
    *,
    wikitext2_path: str | None = None,
) -> np.ndarray:
    """Perplexity windows of every record of ``source`` in order: ``int32[rows, seqlen]``.

    ``"wikitext2"`` is the ``wikitext-2-raw-v1`` test split (all 4,358 rows, empty ones included,
    joined with ``"\\n\\n"``). It is read from a local ``wiki.test.rows.jsonl`` when one is given
    (``wikitext2_path`` or ``$MULTIPRUNER_WIKITEXT2``) or when the hub is offline or unreachable
    (then the copy ``install_wikitext2`` put in the assets folder); local copies are checked
    against the split's sha256.
    A local path evaluates all of its records.
    """
    check_source(source, evaluation=True)
    key = {
        "kind": "evaluation",
        "source": _source_identity(source, wikitext2_path),
        "tokenizer": _tokenizer_identity(tokenizer),
        "seqlen": seqlen,
    }

    def build() -> tuple[np.ndarray]:
        records = load_records(source, wikitext2_path=wikitext2_path)
        return (_windows_of(records, tokenizer, seqlen, f"{source!r}"),)

    return _cached(cache_dir, key, ("tokens",), build)[0]


def sample_calibration_texts(
    records: list[str], num_width: int, num_block: int, seed: int = 42, source: str = "pool"
) -> tuple[list[str], list[str]]:
    """Draw the width set, then the block set, with ``random.Random(seed).sample``.

    This is the reference's ``random.seed(seed)`` followed by two ``random.sample(range(n), k)``
    calls; the two sets may overlap and keep the sampled order.
    """
    for what, count in (("num_width", num_width), ("num_block", num_block)):
        if count < 1:
            raise ValueError(f"{what} must be at least 1, got {count}")
        if count > len(records):
            raise ValueError(
                f"calibration source {source!r} has {len(records)} records, "
                f"fewer than the {count} requested by {what}"
            )
    rng = random.Random(seed)
    width = [records[i] for i in rng.sample(range(len(records)), num_width)]
    block = [records[i] for i in rng.sample(range(len(records)), num_block)]
    return width, block


def load_records(source: str, *, wikitext2_path: str | None = None) -> list[str]:
    """The text records of ``source``: the calibration pool, or the evaluation rows in order.

    Named pools follow the reference: ``alpaca`` is ``tatsu-lab/alpaca``'s ``text`` column after
    ``train_test_split(test_size=0.2, seed=42)["test"]`` and then
    ``train_test_split(test_size=0.5, seed=42)["train"]``; ``wikitext2`` is the test split;
    ``ptb`` is the ``penn_treebank`` test split (its ``sentence`` column). The reference asks C4
    for a ``test`` split that its two data files do not have; ``c4`` here is the ``text`` of the
    validation file it loads, ``en/c4-validation.00000-of-00008.json.gz``.
    """
    kind, path = _resolve(source)
    if kind == "named":
        return _NAMED_LOADERS[source](wikitext2_path)
    return _pool_texts(source, kind)


def format_alpaca(instruction: str, input: str, output: str) -> str:
    """One Alpaca example as the ``text`` column of ``tatsu-lab/alpaca`` writes it."""
    template = ALPACA_PROMPT_WITH_INPUT if input else ALPACA_PROMPT
    return template.format(instruction=instruction, input=input, output=output)


def _windows_of(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, seqlen: int, what: str
) -> np.ndarray:
    try:
        return tokenize_windows(texts, tokenizer, seqlen)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from error


def check_source(source: str, *, evaluation: bool = False) -> None:
    """Raise ``ValueError`` unless ``source`` names a text source (an evaluation source when
    ``evaluation``: WikiText-2 or a local path), without reading it."""
    if evaluation and source in NAMED_SOURCES and source != "wikitext2":
        raise ValueError(f"evaluation source {source!r}: expected 'wikitext2' or a local path")
    if source in NAMED_SOURCES and source != "wikitext2" and hub_offline():
        raise ValueError(
            f"text source {source!r} comes from the Hugging Face hub, which is switched off "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); pass a local copy instead"
        )
    _resolve(source)


def _resolve(source: str) -> tuple[str, Path | None]:
    """Classify ``source``: ``("named", None)`` or (one of ``_LOCAL_KINDS``, its path)."""
    if source in NAMED_SOURCES:
        return "named", None
    path = Path(source)
    kind = records.local_kind(source)
    if kind in _LOCAL_KINDS:
        return kind, path
    what = "exists but is not a supported source" if path.exists() else "is unknown"
    raise ValueError(f"text source {source!r} {what}: expected {_ACCEPTED}")


def _source_identity(source: str, wikitext2_path: str | None) -> dict:
    """What makes a source's records what they are: its name, or its files' sizes and mtimes."""
    kind, path = _resolve(source)
    if kind == "named":
        local = _wikitext2_override(wikitext2_path) if source == "wikitext2" else None
        return {"name": source, "files": _file_stats(local) if local else []}
    return {"kind": kind, "path": str(path.resolve()), "files": _file_stats(path)}


def _file_stats(path: Path) -> list[tuple[str, int, str]]:
    """Each file of ``path`` (a file or folder): its path, size and the sha256 of its content."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, _sha256(p)) for p in files]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does: its serialized form (fast tokenizers: the whole
    ``tokenizer.json``; others: the vocabulary), special tokens and BOS/EOS settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    form = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    settings = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "bos_eos": [str(getattr(tokenizer, k, None)) for k in ("add_bos_token", "add_eos_token")],
    }
    payload = form + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _cached(
    cache_dir: str | None,
    key: dict,
    parts: tuple[str, ...],
    build: Callable[[], tuple[np.ndarray, ...]],
) -> tuple[np.ndarray, ...]:
    """Return ``build()``, reading it from / writing it to ``cache_dir`` when one is given."""
    if cache_dir is None:
        return build()
    payload = json.dumps({"version": _CACHE_VERSION, **key}, sort_keys=True).encode()
    stem = f"{key['kind']}-{hashlib.sha256(payload).hexdigest()[:32]}"
    paths = [Path(cache_dir) / f"{stem}.{part}.npy" for part in parts]
    atomic.remove_dead_temporaries(cache_dir)
    if all(p.is_file() for p in paths):
        cached = _read_cached(paths, key["seqlen"])
        if cached is not None:
            _log.info("token windows read from cache %s", paths[0].parent)
            return cached
    arrays = build()
    for path, array in zip(paths, arrays, strict=True):
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic.write_bytes(path, buffer.getvalue())
    return arrays


def _read_cached(paths: list[Path], seqlen: int) -> tuple[np.ndarray, ...] | None:
    """The cached windows, or ``None`` (with a warning; they are rebuilt) when a file cannot be
    read or is not ``int32[rows, seqlen]``."""
    arrays = []
    for path in paths:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            _log.warning("token cache %s is unreadable (%s); rebuilding it", path, error)
            return None
        if array.dtype != np.int32 or array.ndim != 2 or array.shape[1] != seqlen:
            _log.warning(
                "token cache %s holds %s%s, not int32[rows, %d]; rebuilding it",
                path,
                array.dtype,
                list(array.shape),
                seqlen,
            )
            return None
        arrays.append(array)
    return tuple(arrays)


def _pool_texts(source: str, kind: str) -> list[str]:
    """The calibration records of a local source: every non-empty paragraph (separated by blank
    lines, whitespace-stripped) of its text files, or the text of each JSON object or row."""
    found = records.read(source, kind)
    if kind in ("txt", "txt_dir"):
        return [
            paragraph.strip()
            for record in found
            for paragraph in re.split(r"\n[ \t]*\n", record.fields["text"])
            if paragraph.strip()
        ]
    return [_record_text(record.fields, record.where) for record in found]


def _record_text(row: dict, where: str) -> str:
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        return format_alpaca(row["instruction"], row.get("input") or "", row["output"])
    raise ValueError(
        f"{where}: a record needs a 'text' string or Alpaca 'instruction' and 'output' strings"
    )


def _wikitext2_override(wikitext2_path: str | None) -> Path | None:
    local = wikitext2_path or os.environ.get(WIKITEXT2_ENV)
    return Path(local) if local else None


def _load_wikitext2(wikitext2_path: str | None) -> list[str]:
    local = _wikitext2_override(wikitext2_path)
    installed = assets.wikitext2_file()
    if local is None and not hub_offline():
        try:
            return list(_hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", "test")["text"])
        except HubUnavailable as error:
            _log.warning("%s; reading the local copy %s", error, installed)
    local = local or installed
    if not local.is_file():
        raise FileNotFoundError(
            f"WikiText-2 test rows {local} not found (the hub is offline or unreachable); "
            f"expected ${WIKITEXT2_ENV} naming the split's wiki.test.rows.jsonl, or a copy "
            "installed by scripts/prepare_assets.py --wikitext2=FILE"
        )
    return _checked_wikitext2(local)


def install_wikitext2(source: str | os.PathLike[str], root: str | None = None) -> str:
    """Copy the WikiText-2 test rows ``source`` (checked) to the assets folder; a line saying so.

    ``source`` is the ``wiki.test.rows.jsonl`` file or a folder holding one.
    """
    final = assets.wikitext2_file(root)
    source = Path(source)
    if source.is_dir():
        source = source / final.name
        if not source.is_file():
            raise FileNotFoundError(f"{source.parent} holds no {final.name} (WikiText-2 test rows)")
    _checked_wikitext2(source)
    atomic.write_bytes(final, source.read_bytes())
    return f"WikiText-2 test split: {final} (from {source})"


def _checked_wikitext2(local: Path) -> list[str]:
    rows = [_record_text(r.fields, r.where) for r in records.read(str(local), "jsonl")]
    digest = hashlib.sha256("\n\n".join(rows).encode("utf-8")).hexdigest()
    if digest != WIKITEXT2_TEST_SHA256:
        raise ValueError(f"{local} is not the wikitext-2-raw-v1 test split (sha256 {digest})")
    return rows


def _load_alpaca(_: str | None) -> list[str]:
    dataset = _hub_dataset("tatsu-lab/alpaca", None, "train")
    dataset = dataset.remove_columns(["input", "output", "instruction"])
    held_out = dataset.train_test_split(test_size=0.2, seed=42)["test"]
    return list(held_out.train_test_split(test_size=0.5, seed=42)["train"]["text"])


def _load_c4(_: str | None) -> list[str]:
    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    return list(_hub_dataset("allenai/c4", None, "validation", data_files=files)["text"])


def _load_ptb(_: str | None) -> list[str]:
    return list(_hub_dataset("ptb_text_only", "penn_treebank", "test")["sentence"])


class HubUnavailable(OSError):
    """A named source could not be fetched from the Hugging Face hub."""


def _hub_dataset(path: str, name: str | None, split: str, data_files: dict | None = None):
    import datasets

    try:
        return datasets.load_dataset(path, name=name, split=split, data_files=data_files)
    except OSError as error:
        raise HubUnavailable(
            f"could not load {path} from the Hugging Face hub ({error}); offline, pass a local "
            "copy as the source instead"
        ) from error


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag.strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


_NAMED_LOADERS: dict[str, Callable[[str | None], list[str]]] = {
    "alpaca": _load_alpaca,
    "wikitext2": _load_wikitext2,
    "c4": _load_c4,
    "ptb": _load_ptb,
}
