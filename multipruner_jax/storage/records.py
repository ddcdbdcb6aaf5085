"""One reader of local text sources: files -> records, with one set of errors.

Calibration (``data.py``) and fine-tuning (``finetune_data.py``) read the same kinds of local
files. This module reads them; each of the two formats the records its own way (calibration
renders Alpaca rows as one string and cuts plain text into paragraphs; fine-tuning checks the
instruction fields and keeps every text file one document) and says which kinds it accepts.

Kinds, as ``local_kind`` names them:

* ``txt``: a ``.txt`` file; ``txt_dir``: a folder of ``.txt`` files; ``txt_glob``: a glob
  matching ``.txt`` files. One record per file, in name order: ``{"text": the whole file}``.
* ``jsonl``: one JSON object per non-blank line; ``json``: a JSON list of objects.
* ``arrow``: a ``datasets`` ``save_to_disk`` folder holding one split; one record per row.

Text is UTF-8, and line ends are read as Python's text mode reads them (``\\r\\n`` and ``\\r``
become ``\\n``). A ``Record`` carries ``where`` (``file:line``, the file, or ``folder row i``) for
the formatters' messages about missing fields. Every error here is a ``SourceError``: one
sentence that starts with the file (and line), such as ``f.jsonl:2: not UTF-8 text (invalid start
byte at byte 17)``, ``f.jsonl:3: not valid JSON (...)``, ``f.json: holds no records; expected at
least one``, or an Arrow folder of several splits.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("txt", "txt_dir", "txt_glob", "jsonl", "json", "arrow")


class SourceError(ValueError):
    """A local text source that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Record:
    """One record of a source: ``fields`` (a JSON object, an Arrow row, or ``{"text": ...}`` for
    a text file) and ``where`` it came from, for messages."""

    where: str
    fields: dict[str, Any]


def local_kind(source: str) -> str | None:
    """The kind of the local source ``source`` (one of ``KINDS``), or ``None`` when it is none."""
    path = Path(source)
    if path.is_file():
        return {".txt": "txt", ".jsonl": "jsonl", ".json": "json"}.get(path.suffix)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "arrow"
        return "txt_dir" if any(path.glob("*.txt")) else None
    if glob.has_magic(source) and text_files(source, "txt_glob"):
        return "txt_glob"
    return None


def text_files(source: str, kind: str) -> list[Path]:
    """The ``.txt`` files of a ``txt``, ``txt_dir`` or ``txt_glob`` source, in name order."""
    if kind == "txt":
        return [Path(source)]
    if kind == "txt_dir":
        return sorted(Path(source).glob("*.txt"))
    matches = (Path(p) for p in glob.glob(source) if p.endswith(".txt") and os.path.isfile(p))
    return sorted(matches, key=str)


def read(source: str, kind: str) -> list[Record]:
    """Every record of ``source``, a local source of ``kind``, in order."""
    if kind in ("txt", "txt_dir", "txt_glob"):
        return [Record(str(f), {"text": read_text(f)}) for f in text_files(source, kind)]
    rows = {"jsonl": _jsonl_rows, "json": _json_list_rows, "arrow": _arrow_rows}[kind](Path(source))
    records = list(rows)
    if not records:
        raise SourceError(f"{source}: holds no records; expected at least one")
    return records


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` with ``\\n`` line ends; a decoding error names the file and
    line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise SourceError(
            f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _object(row: Any, where: str) -> Record:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return Record(where, row)


def _jsonl_rows(path: Path) -> Iterator[Record]:
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        yield _object(row, f"{path}:{number}")


def _json_list_rows(path: Path) -> Iterator[Record]:
    """The elements of a JSON list file, each named by the line it starts on."""
    text = read_text(path)
    if not text.strip():
        return
    decoder = json.JSONDecoder()
    pos = _skip(text, 0, "", path)
    if not text.startswith("[", pos):
        raise SourceError(f"{path}: expected a JSON list of records")
    pos = _skip(text, pos + 1, "", path)
    while not text.startswith("]", pos):
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        yield _object(row, f"{path}:{line}")
        pos = _skip(text, pos, ",", path)
    if text[pos + 1 :].strip():
        raise SourceError(f"{path}:{text.count(chr(10), 0, pos) + 1}: text after the list")


def _skip(text: str, pos: int, separator: str, path: Path) -> int:
    """Position of the next non-blank character after at most one ``separator``."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if separator and text.startswith(separator, pos):
        pos += 1
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if pos >= len(text):
        raise SourceError(f"{path}: the JSON list ends unexpectedly")
    return pos


def _arrow_rows(path: Path) -> Iterator[Record]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise SourceError(
            f"{path} holds several splits ({', '.join(dataset)}); pass one split's folder"
        )
    for i, row in enumerate(dataset):
        yield Record(f"{path} row {i}", row)
