"""Console output every long job shares: a status line and a clock.

Design: the search (``progress``), zero-shot evaluation (``zeroshot``) and fine-tuning
(``recovery``) all report long work the same way, so the two helpers live here, below all of
them, and import nothing of the project. ``StatusLine`` rewrites one line in place on a terminal
and throttles itself elsewhere (log files, pipes), so a log holds a line per interval, not one per
candidate or request.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    """``seconds`` as ``h:mm:ss``."""
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StatusLine:
    """One status line on ``stream``: rewritten in place on a terminal; elsewhere printed at
    most every ``every`` seconds, and always when ``final``."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 10.0):
        self.stream = stream
        self.every = every
        self.live = stream.isatty()
        self._last = -float("inf")

    def show(self, line: str, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            print(line, file=self.stream, flush=True)

    def clear(self) -> None:
        """Remove a line rewritten in place (before printing a line of one's own)."""
        if self.live:
            self.stream.write("\r\033[K")
