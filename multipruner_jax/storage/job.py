"""The output folder of a job, and its messages: one skeleton for pruning and fine-tuning.

Both jobs own an ``--output_path`` folder for their whole life and share these rules:

* ``JobFolder.check``: the flag is given, the path is a folder or can become one, and this
  process can write there (a probe folder, removed at once), before any expensive work;
* ``JobFolder.owned``: process 0 holds the folder's ``ownership`` lock from start to end, so a
  second run on the same folder is refused while the first lives;
* ``JobFolder.check_start``: a new run refuses a folder that already holds a run (its state
  file), ``--resume`` refuses one that holds none;
* ``check_resume_identity``: a resumed run must share the options that determine the result with
  the run it continues (``identity`` dicts, compared by value); the refusal names every
  difference as ``{option: (saved, now)}``;
* ``JobFolder.write_flags``: ``flags.txt``, the effective flags as a reusable flagfile, written
  by process 0 once the run is accepted (a refused run leaves the old one alone);
* ``say`` and ``progress``: what a job reports (what it loaded, its summary) goes to stdout, its
  transient progress lines (updates, losses, ETAs) to stderr; both from process 0 only and
  silenced by ``--quiet``.

What differs stays with each job: which state file marks a run, what its identity holds, and
what else it checks (the prune job also checks that its checkpoint can be replaced).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import jax

from multipruner_jax.base import atomic, ownership

FLAGS_FILE = "flags.txt"


def is_writer() -> bool:
    """Whether this process writes the job's files and messages (process 0)."""
    return jax.process_index() == 0


def say(text: str, quiet: bool = False) -> None:
    """A report line of the job on stdout (process 0, unless ``quiet``)."""
    if not quiet and is_writer():
        print(text, flush=True)


def progress(text: str, quiet: bool = False) -> None:
    """A progress line of the job on stderr (process 0, unless ``quiet``)."""
    if not quiet and is_writer():
        print(text, file=sys.stderr, flush=True)


class JobFolder:
    """The folder ``path`` a job writes, named ``flag`` in its messages."""

    def __init__(self, path: str, flag: str = "--output_path"):
        self.path = path
        self.flag = flag

    def join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    def check(self) -> None:
        """``path`` is given, and is a folder or can become one that this process can write."""
        if not self.path:
            raise ValueError(f"{self.flag} is required")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"{self.flag}={self.path} exists and is not a directory")
        existing = os.path.abspath(self.path)
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        try:
            probe = tempfile.TemporaryDirectory(prefix=".multipruner-probe-", dir=existing)
        except OSError as error:
            raise ValueError(
                f"{self.flag}={self.path}: cannot write in {existing} ({error.strerror})"
            ) from None
        probe.cleanup()

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """Hold the folder's lock for the block (process 0; other processes hold none)."""
        if not is_writer():
            yield
            return
        with ownership.lock(self.path, f"{self.flag}={self.path}"):
            yield

    def check_start(self, state_file: str, resume: bool, what: str) -> str:
        """The path of the run's ``state_file``, after refusing a new run on a folder that holds
        ``what`` (for example "a search") and a ``resume`` of a folder that holds none."""
        state = self.join(state_file)
        if not resume and os.path.exists(state):
            raise ValueError(
                f"{self.flag}={self.path} already holds {what}; pass --resume to continue it or "
                "choose another output path"
            )
        if resume and not os.path.isfile(state):
            raise ValueError(f"--resume: {state} does not exist; nothing to resume")
        return state

    def write_flags(self, text: str | None) -> None:
        """``flags.txt`` (process 0; nothing when ``text`` is None)."""
        if text is not None and is_writer():
            atomic.write_text(self.join(FLAGS_FILE), text)


def check_resume_identity(
    saved: dict[str, Any], now: dict[str, Any], what: str, where: str
) -> None:
    """Refuse a resume whose ``now`` identity differs from the ``saved`` one of ``what`` (for
    example "search") in folder ``where``, naming every difference."""
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        raise ValueError(
            f"--resume: {', '.join('--' + k for k in diff)} differ from the {what} saved in "
            f"{where}, which used other options (saved, now): {diff}"
        )
