"""Atomic file and directory writes: a temporary sibling, renamed into place when complete.

A reader never sees a half-written file or directory under its final name: it sees the old
version, or the new one, or (for a directory replaced after a kill between two renames) nothing.
Everything created here honours the process umask, like ``open`` and ``mkdir`` do, so outputs on
shared storage are as readable as any other file the user writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TMP = "tmp"
_OLD = "old"


def _sibling(path: Path, kind: str, token: str | None = None) -> Path:
    """A hidden name beside ``path``: ``.<name>.<kind>-<token or random>``."""
    return path.with_name(f".{path.name}.{kind}-{token or uuid.uuid4().hex[:8]}")


@dataclass(frozen=True)
class Shared:
    """A directory that several processes write at once (each its part of a sharded array).

    ``token`` names the temporary directory (the same in every process), ``owner`` is true in the
    one process that creates, renames and cleans up, and ``sync()`` returns once every process
    has called it.
    """

    token: str
    owner: bool
    sync: Callable[[], None]


def stale_siblings(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary siblings of ``path`` left behind by writes that were killed."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.{_TMP}-*"))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, _TMP)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def directory(final: str | os.PathLike[str], shared: Shared | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` when the block succeeds.

    Stale temporary siblings of ``final`` (from a killed write) are removed first. On success an
    existing ``final`` is renamed aside, the new directory renamed in, and the old one deleted, so
    ``final`` is never a mix of both; on any error the temporary directory is removed and
    ``final`` is left as it was. With ``shared``, every process gets the same directory, only
    the owner prepares and renames it, and all wait for each other before and after the block.
    """
    owner = shared is None or shared.owner
    sync = shared.sync if shared is not None else lambda: None
    final = Path(final).absolute()
    tmp = _sibling(final, _TMP, shared.token if shared is not None else None)
    if owner:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in stale_siblings(final):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    sync()
    try:
        yield tmp
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync()
    if owner:
        old = _sibling(final, _OLD) if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    sync()
