"""Console progress for the search: a live line per step and a summary table at the end."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from multipruner_jax.search import Progress, Shortfall, Stage, Step


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
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


class ConsoleProgress(Progress):
    """Search progress: a status line per candidate, a line per accepted step."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 10.0, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.status = StatusLine(stream, every)

    def candidate(
        self,
        stage: Stage,
        step: int,
        done: int,
        total: int,
        best: float,
        ratio: float,
        eta: float,
        search_eta: float,
    ) -> None:
        if not self.enabled:
            return
        line = (
            f"[{stage}] step {step}: candidates {done}/{total}, best ppl {best:.4f}, "
            f"ratio {ratio:.2f}%, step ETA {clock(eta)}, search ETA ~{clock(search_eta)}"
        )
        # the step's last line stays open on a terminal: ``accepted`` replaces it
        self.status.show(line, final=done == total and not self.status.live)

    def accepted(self, record: Step, search_eta: float) -> None:
        if not self.enabled:
            return
        self.status.clear()
        print(
            f"[{record.stage}] step {record.step}: removed {record.candidate.describe()} "
            f"-> ppl {record.ppl:.4f}, ratio {record.ratio:.2f}% (target {record.target:.2f}%), "
            f"{record.candidates} candidates in {record.seconds:.1f}s, {record.compiles} compiles"
            f", search ETA ~{clock(search_eta)}",
            file=self.stream,
            flush=True,
        )

    def exhausted(self, shortfall: Shortfall) -> None:
        if self.enabled:
            print(f"warning: {shortfall.describe()}", file=self.stream, flush=True)


def summary_table(steps: list[Step]) -> str:
    """A plain-text table of the accepted steps."""
    head = f"{'step':>4}  {'stage':<9}  {'removed':<13}  {'ppl':>10}  {'ratio%':>7}  {'cands':>5}"
    head += f"  {'sec':>7}  {'compiles':>8}"
    rows = [head, "-" * len(head)]
    for s in steps:
        rows.append(
            f"{s.step:>4}  {s.stage:<9}  {s.kind + ' L' + str(s.layer):<13}  {s.ppl:>10.4f}  "
            f"{s.ratio:>7.2f}  {s.candidates:>5}  {s.seconds:>7.1f}  {s.compiles:>8}"
        )
    return "\n".join(rows)
