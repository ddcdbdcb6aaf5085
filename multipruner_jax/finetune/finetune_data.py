"""Fine-tuning data: instruction records or plain text -> token rows with loss weights, batched.

Two kinds of source:

* **Instruction records** with ``instruction``, optional ``input`` and ``output`` strings: an Alpaca
  ``.json`` file (a list of records), a ``.jsonl`` file, a ``datasets`` ``save_to_disk`` folder of
  one split, or a Hugging Face hub dataset id such as ``yahma/alpaca-cleaned`` (its ``train`` split,
  read with ``datasets``). Each record is rendered with the Alpaca-LoRA template
  (``data.ALPACA_PROMPT[_WITH_INPUT]``); the prompt is the template up to and including
  ``"### Response:\\n"``. As in Alpaca-LoRA, the full text is tokenized (the tokenizer's default
  special tokens, truncated to ``max_len``), EOS is appended when it fits, and only the tokens after
  the prompt's own token count are targets.
* **Plain text** as causal-LM data: a ``.txt`` file, a folder of ``.txt`` files, or a glob such as
  ``.assets/sotu/1*.txt``. Every document is tokenized, followed by EOS, the documents are
  concatenated and cut into rows of exactly ``max_len`` tokens (the tail is dropped); every token
  after a row's first is a target.

Local files are read by ``records.py`` (one reader, one set of errors naming the file and line);
this module checks and tokenizes what it reads.

An ``Example`` is ``tokens: int32[n]`` with ``weights: float32[n]``, ``weights[j] = 1`` when token
``j`` is a target (it is predicted from position ``j - 1``; ``weights[0]`` is always 0). Batches
group examples of similar length into a few bucket lengths (right-padded, padding weighted 0), so
only a few shapes ever compile.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from multipruner_jax.storage import records
from multipruner_jax.storage.data import format_alpaca

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ACCEPTED = (
    "an Alpaca .json or .jsonl file or datasets save_to_disk folder (instruction/input/output), a "
    ".txt file, a folder of .txt files, a glob of .txt files, or a Hugging Face dataset id such "
    "as yahma/alpaca-cleaned"
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: ``tokens: int32[n]``, ``weights: float32[n]`` (1 = target token)."""

    tokens: np.ndarray
    weights: np.ndarray

    @property
    def targets(self) -> int:
        return int(self.weights.sum())


@dataclasses.dataclass(frozen=True)
class Batch:
    """``tokens: int32[rows, length]``, ``weights: float32[rows, length]``; ``real_tokens``
    counts the non-padding tokens."""

    tokens: np.ndarray
    weights: np.ndarray
    real_tokens: int


# -- sources ----------------------------------------------------------------------------------


# The kinds of local source (``records.KINDS``) fine-tuning reads, by the examples they give.
_RECORD_KINDS = ("json", "jsonl", "arrow")
_TEXT_KINDS = ("txt", "txt_dir", "txt_glob")


def source_kind(source: str) -> str:
    """``"records"`` or ``"text"`` for a source (see the module docstring); raises
    ``ValueError`` naming the source when it is neither."""
    kind = records.local_kind(source)
    if kind in _RECORD_KINDS:
        return "records"
    if kind in _TEXT_KINDS:
        return "text"
    path = Path(source)
    local = path.suffix in (".json", ".jsonl", ".txt") or source.startswith((".", "/"))
    if not path.exists() and not local and not glob.has_magic(source) and source.count("/") == 1:
        return "records"
    what = "exists but is not a supported source" if path.exists() else "matches nothing"
    raise ValueError(f"fine-tuning data {source!r} {what}: expected {_ACCEPTED}")


def read_records(source: str) -> list[dict[str, str]]:
    """Instruction records of a ``.json``/``.jsonl`` file, an Arrow folder or a hub dataset id,
    checked: every record needs ``instruction`` and ``output`` strings (``input``, if present, a
    string)."""
    kind = records.local_kind(source)
    if kind in _RECORD_KINDS:
        return [_check_record(r.fields, r.where) for r in records.read(source, kind)]
    return _hub_records(source)


def _check_record(row: dict[str, Any], where: str) -> dict[str, str]:
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing or not isinstance(row.get("input", ""), str | None):
        bad = ", ".join(repr(k) for k in missing) or "'input'"
        raise ValueError(
            f"{where}: an instruction record needs 'instruction' and 'output' strings "
            f"(and 'input', if present, a string); {bad} is missing or not a string"
        )
    return {
        "instruction": row["instruction"],
        "input": row.get("input") or "",
        "output": row["output"],
    }


def _hub_records(dataset_id: str) -> list[dict[str, str]]:
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load the dataset {dataset_id!r} from the Hugging Face hub ({error}); "
            "offline, pass a local .json/.jsonl copy instead"
        ) from None
    return [_check_record(row, f"{dataset_id} row {i}") for i, row in enumerate(rows)]


def read_texts(source: str) -> list[str]:
    """The documents of a ``.txt`` file, a folder of ``.txt`` files or a glob, in name order."""
    if source_kind(source) != "text":
        raise ValueError(f"fine-tuning data {source!r}: expected .txt files for plain text")
    return [r.fields["text"] for r in records.read(source, records.local_kind(source))]


# -- tokenization -----------------------------------------------------------------------------


def instruction_example(
    record: dict[str, str], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> Example:
    """One record as Alpaca-LoRA tokenizes it: targets are the response tokens (and EOS)."""
    prompt = format_alpaca(record["instruction"], record["input"], "")
    full = prompt + record["output"]
    ids = tokenizer(full, truncation=True, max_length=max_len)["input_ids"]
    eos = tokenizer.eos_token_id
    if ids and ids[-1] != eos and len(ids) < max_len:
        ids = ids + [eos]
    prompt_len = len(tokenizer(prompt, truncation=True, max_length=max_len)["input_ids"])
    weights = np.zeros(len(ids), np.float32)
    weights[max(prompt_len, 1) :] = 1.0
    return Example(np.asarray(ids, np.int32), weights)


def text_examples(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> list[Example]:
    """Documents -> rows of ``max_len`` tokens (each document followed by EOS), all targets."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // max_len
    if rows == 0:
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than one row of {max_len}")
    tokens = np.asarray(ids[: rows * max_len], np.int32).reshape(rows, max_len)
    weights = np.ones(max_len, np.float32)
    weights[0] = 0.0
    return [Example(row, weights) for row in tokens]


def load_examples(
    source: str, tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tuple[str, list[Example]]:
    """``(kind, examples)`` of a source, one example per record or text row, in source order."""
    if max_len < 2:
        raise ValueError(f"--max_len={max_len}: expected at least 2 tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which the fine-tuning data needs")
    kind = source_kind(source)
    try:
        if kind == "records":
            found = read_records(source)
            examples = [instruction_example(r, tokenizer, max_len) for r in found]
        else:
            examples = text_examples(read_texts(source), tokenizer, max_len)
    except records.SourceError as error:
        raise ValueError(f"--data={error}") from None
    if not examples:
        raise ValueError(f"--data={source}: holds no records; expected at least one")
    return kind, examples


def split_heldout(count: int, heldout: int, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` indices into ``count`` items, as ``datasets``'
    ``train_test_split(test_size=heldout, seed=seed)`` draws them (the first ``heldout`` of a
    ``default_rng(seed)`` permutation are held out; the rest train, in permuted order)."""
    if not 0 <= heldout < count:
        raise ValueError(
            f"--eval_examples={heldout}: expected 0 or more and fewer than the {count} examples"
        )
    order = np.random.default_rng(seed).permutation(count)
    return order[heldout:], order[:heldout]


# -- batching ---------------------------------------------------------------------------------


def bucket_lengths(max_len: int, buckets: int) -> tuple[int, ...]:
    """``buckets`` row lengths up to ``max_len``, evenly spaced and rounded up to multiples of 8
    (``max_len`` itself is always the last)."""
    if buckets < 1:
        raise ValueError(f"--buckets={buckets}: expected at least 1")
    lengths = {min(max_len, 8 * math.ceil(max_len * (i + 1) / buckets / 8)) for i in range(buckets)}
    return tuple(sorted(lengths))


def _bucket_of(length: int, lengths: tuple[int, ...]) -> int:
    return next(i for i, b in enumerate(lengths) if b >= length)


def make_batch(examples: list[Example], rows: int, length: int, pad_id: int) -> Batch:
    """Right-pad ``examples`` to ``length`` and add all-padding rows up to ``rows``."""
    tokens = np.full((rows, length), pad_id, np.int32)
    weights = np.zeros((rows, length), np.float32)
    for r, ex in enumerate(examples):
        tokens[r, : len(ex.tokens)] = ex.tokens
        weights[r, : len(ex.weights)] = ex.weights
    return Batch(tokens, weights, sum(len(ex.tokens) for ex in examples))


def plan_batches(
    examples: list[Example],
    batch_size: int,
    lengths: tuple[int, ...],
    pad_id: int,
    seed: int | list[int] | None,
) -> list[Batch]:
    """All examples in batches of ``batch_size`` rows, each batch from one length bucket.

    ``seed=None`` keeps the source order (evaluation); otherwise examples are shuffled within
    buckets and batches are shuffled by ``default_rng(seed)``. The number of batches and their
    shapes do not depend on the seed.
    """
    rng = None if seed is None else np.random.default_rng(seed)
    order = np.arange(len(examples)) if rng is None else rng.permutation(len(examples))
    by_bucket: list[list[Example]] = [[] for _ in lengths]
    for i in order:
        by_bucket[_bucket_of(len(examples[i].tokens), lengths)].append(examples[i])
    batches = [
        make_batch(group[s : s + batch_size], batch_size, length, pad_id)
        for group, length in zip(by_bucket, lengths, strict=True)
        for s in range(0, len(group), batch_size)
    ]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchStream:
    """The endless, deterministic sequence of training micro-batches: epoch ``e`` is
    ``plan_batches(examples, ..., seed=[seed, e])``; ``batch(m)`` is the ``m``-th overall."""

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        lengths: tuple[int, ...],
        pad_id: int,
        seed: int,
    ):
        if not examples:
            raise ValueError("no training examples with a target token are left")
        self.examples = examples
        self.batch_size = batch_size
        self.lengths = lengths
        self.pad_id = pad_id
        self.seed = seed
        self.per_epoch = sum(
            math.ceil(c / batch_size)
            for c in np.bincount(
                [_bucket_of(len(ex.tokens), lengths) for ex in examples], minlength=len(lengths)
            )
        )
        self._epoch: tuple[int, list[Batch]] | None = None

    def batch(self, m: int) -> Batch:
        epoch, index = divmod(m, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            batches = plan_batches(
                self.examples,
                self.batch_size,
                self.lengths,
                self.pad_id,
                seed=[self.seed, epoch],
            )
            self._epoch = (epoch, batches)
        return self._epoch[1][index]
