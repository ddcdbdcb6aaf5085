"""Console progress for the search: a live line per step and a summary table at the end.

The status line and the clock are ``console``'s, shared with zero-shot evaluation and
fine-tuning; what is here knows the search's stages and steps.
"""

from __future__ import annotations

import sys
from typing import TextIO

from multipruner_jax.base.console import StatusLine, clock
from multipruner_jax.prune.search import Progress, Shortfall, Stage, Step


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
