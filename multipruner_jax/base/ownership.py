"""Who owns an output folder: one exclusive lock per folder, held for a run's whole life.

A run takes ``lock(folder)`` before it writes anything there. The lock is ``fcntl.flock`` on a
hidden file beside the folder, ``.<name>.lock``, which records the owner (host, pid) for the
message a second run gets. The kernel drops the lock when its process dies (also by SIGKILL), so
a lock file left by a killed run is free and taken over; a live run's lock refuses everyone else.
The lock file is removed when the run releases it; a run that takes a free lock file checks that
it still is the file at that path (a releasing run may just have removed it) and retries if not.

Locks are re-entrant within one process: an export inside a prune job, or a checkpoint write
inside a run that owns the folder, share the run's lock.

Temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``) are only ever created by the holder of
``<name>``'s lock, so whoever holds that lock may remove them. Names made by ``atomic`` also
record their creator (``-<pid>-<host>``), which lets folders nobody locks (the token cache)
remove files whose creator is provably gone: same host, process no longer running.

Guarantees: on a local disk (and for processes on one host) the lock is exact. On NFS (Cloud
Filestore included) Linux maps ``flock`` to NFS byte-range locks, so runs on different hosts
exclude each other as long as the server supports locking (NFSv4, or NFSv3 with ``lockd``, which
Filestore provides); a mount with ``nolock``/``local_lock=all`` only excludes runs on the same
host. gcsfuse has no cross-host locks at all: there, only runs on the same host exclude each
other, so do not start two runs on one gcsfuse folder from different hosts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST = socket.gethostname()
_held: dict[str, _Held] = {}  # lock file path -> this process's lock on it

# ``.<name>.<kind>-<8 hex>`` optionally followed by ``-<pid>-<host>`` (see ``atomic``).
_SIBLING = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}(?:-(?P<pid>\d+)-(?P<host>.+))?$"
)


class FolderBusy(ValueError):
    """Another live run holds the folder."""


@dataclass
class _Held:
    fd: int
    count: int
    created: list[Path]  # folders made to hold the lock file, removed on release when empty


def lock_file(folder: str | os.PathLike[str]) -> Path:
    """The lock file of ``folder``: ``.<name>.lock`` beside its real (symlink-free) path."""
    real = Path(os.path.realpath(folder))
    return real.with_name(f".{real.name}.lock")


def owner_suffix() -> str:
    """``-<pid>-<host>``: how temporary names record the process that made them."""
    return f"-{os.getpid()}-{HOST}"


@contextlib.contextmanager
def lock(folder: str | os.PathLike[str], what: str = "") -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` for the block (re-entrant within this process).

    Raises ``FolderBusy`` (one sentence naming the live run's host and pid) when another process
    holds it. ``what`` names the folder in that message (e.g. ``--output_path=out``).
    """
    path = lock_file(folder)
    key = str(path)
    if key in _held:
        _held[key].count += 1
    else:
        created = _make_parents(path.parent)
        try:
            _held[key] = _Held(_acquire(path, what or str(folder)), 1, created)
        except BaseException:
            _remove_empty(created)
            raise
    try:
        yield
    finally:
        held = _held[key]
        held.count -= 1
        if held.count == 0:
            del _held[key]
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(held.fd)
            _remove_empty(held.created)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):
            created.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def holds(folder: str | os.PathLike[str]) -> bool:
    """Whether this process holds the lock of ``folder``."""
    return str(lock_file(folder)) in _held


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusy(
                f"{what} is in use by another run ({_describe(path)}); wait for it to end or "
                "choose another folder"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            record = json.dumps({"host": HOST, "pid": os.getpid()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            return fd
        os.close(fd)  # the previous owner removed the file between our open and our lock


def _describe(path: Path) -> str:
    """``host H, pid P`` from a lock file, as far as it can be read."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return f"host {owner['host']}, pid {owner['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"lock file {path}"


def creator_gone(path: str | os.PathLike[str]) -> bool:
    """Whether the process that made temporary sibling ``path`` provably no longer runs: its name
    records this host and a pid that is not running. Unknown creators count as alive."""
    match = _SIBLING.match(Path(path).name)
    if not match or match["pid"] is None or match["host"] != HOST:
        return False
    return not pid_alive(int(match["pid"]))


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
