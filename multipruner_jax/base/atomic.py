"""Atomic file and directory writes: a temporary sibling, renamed into place when complete.

A reader never sees a half-written file or directory under its final name: it sees the old
version or the new one. A directory write holds the lock of its final name (``ownership``) from
start to rename, so two writers never share one temporary folder or rename over each other, and
the next writer can tell that leftovers of a killed one are dead: it rolls back an interrupted
replacement (the old directory renamed aside, the new one not yet in place) and removes the
temporary folders. Temporary names record their creator (``-<pid>-<host>``), so
``remove_dead_temporaries`` can clear files of dead writers in folders nobody locks (the token
cache). Everything created here honours the process umask, like ``open`` and ``mkdir`` do, so
outputs on shared storage are as readable as any other file the user writes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multipruner_jax.base import ownership

_TMP = "tmp"
_OLD = "old"


def _sibling(path: Path, kind: str, token: str | None = None) -> Path:
    """A hidden name beside ``path``: ``.<name>.<kind>-<token>``, or with a random token
    ``.<name>.<kind>-<random>-<pid>-<host>`` (its creator, see ``ownership.creator_gone``)."""
    token = token or uuid.uuid4().hex[:8] + ownership.owner_suffix()
    return path.with_name(f".{path.name}.{kind}-{token}")


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


def stale_siblings(path: str | os.PathLike[str], kind: str = _TMP) -> list[Path]:
    """Temporary (``kind="tmp"``) or renamed-aside (``"old"``) siblings of ``path``."""
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"))


def remove_dead_temporaries(folder: str | os.PathLike[str]) -> None:
    """Remove temporary files and folders in ``folder`` whose creator provably no longer runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.glob(".*.tmp-*"):
        if ownership.creator_gone(entry):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_replaceable(path: str | os.PathLike[str], what: str) -> None:
    """``path`` can be replaced as a whole: it is absent or a real directory (not a symlink)."""
    if os.path.islink(path):
        raise ValueError(
            f"{what} is a symbolic link; expected a real folder (or none) that can be replaced as "
            "a whole: pass the link's target instead"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} exists and is not a directory")


def replaces(target: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether replacing folder ``target`` as a whole deletes ``path``: it is ``path`` or one of
    its parents (links resolved)."""
    target, path = os.path.realpath(target), os.path.realpath(path)
    return path == target or path.startswith(target.rstrip(os.sep) + os.sep)


def overlaps(target: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether writing folder ``target`` touches ``path``: ``replaces`` it or lies inside it."""
    return replaces(target, path) or replaces(path, target)


def check_writable_over(out: str, flag: str, source: str | None = None) -> None:
    """``out`` can be replaced by an export of checkpoint ``source``: it is not a symlink and
    replacing it deletes neither the checkpoint nor the prune output folder holding it (a
    folder with ``search_state.json``), and it does not lie inside the checkpoint."""
    check_replaceable(out, f"{flag}={out}")
    if source is None:
        return
    holder = os.path.dirname(os.path.realpath(source))
    if overlaps(out, source) or (
        os.path.isfile(os.path.join(holder, "search_state.json")) and replaces(out, holder)
    ):
        raise ValueError(
            f"{flag}={out} would replace the checkpoint it exports ({source}) or the search "
            "holding it; choose a folder of its own (beside the checkpoint is fine)"
        )


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` without a file name (a full disk, say) raised inside names ``path``."""
    try:
        yield
    except OSError as error:
        if error.errno and not error.filename:
            raise OSError(error.errno, os.strerror(error.errno), str(path)) from None
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling, then rename).

    An ``OSError`` (a full disk, say) always names ``path``."""
    path = Path(path).absolute()
    tmp = _sibling(path, _TMP)
    try:
        with naming(path):
            path.parent.mkdir(parents=True, exist_ok=True)
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


def recover(final: str | os.PathLike[str]) -> None:
    """Clear what killed writes of ``final`` left; call only while holding ``final``'s lock.

    A replacement killed between its two renames left ``final`` missing and the old directory
    aside: it is renamed back (the old version stays, as if the write had not happened). Then
    every temporary and renamed-aside sibling is removed: their writers held the lock, so they
    are gone.
    """
    final = Path(final).absolute()
    olds = stale_siblings(final, _OLD)
    if olds and not os.path.lexists(final):
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.replace(newest, final)
    for stale in stale_siblings(final, _OLD) + stale_siblings(final, _TMP):
        _remove(stale)


@contextlib.contextmanager
def directory(
    final: str | os.PathLike[str],
    shared: Shared | None = None,
    incomplete: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` when the block succeeds.

    The owner holds ``final``'s lock (``ownership.lock``) throughout and first clears what killed
    writes left (``recover``). On success ``incomplete(tmp)`` (if given) must return ``None``
    (else ``ValueError`` with its reason, and nothing is renamed); an existing ``final`` is
    renamed aside, the new directory renamed in, and the old one deleted, so ``final`` is never
    a mix of both; on any error the temporary directory is removed and ``final`` is left as it
    was. A symlinked ``final`` is refused before anything is written. With ``shared``, every
    process gets the same directory, only the owner prepares and renames it, and all wait for
    each other before and after the block.
    """
    owner = shared is None or shared.owner
    sync = shared.sync if shared is not None else lambda: None
    final = Path(final).absolute()
    tmp = _sibling(final, _TMP, shared.token if shared is not None else None)
    with ownership.lock(final) if owner else contextlib.nullcontext():
        if owner:
            check_replaceable(final, str(final))
            final.parent.mkdir(parents=True, exist_ok=True)
            recover(final)
            tmp.mkdir()
        sync()
        try:
            yield tmp
            sync()
            if owner and incomplete is not None and (reason := incomplete(tmp)) is not None:
                raise ValueError(f"{final}: not written, the new version is incomplete ({reason})")
        except BaseException:
            if owner:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if owner:
            old = _sibling(final, _OLD) if final.exists() else None
            if old is not None:
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old)
        sync()
