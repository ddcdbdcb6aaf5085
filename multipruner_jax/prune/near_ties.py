"""Near ties (opt-in, ``--near_tie_margin``): re-score a greedy step's closest candidates on more
calibration tokens before choosing.

A greedy step ranks its candidates on one calibration set (a few rows in the demo). When several
candidates land within a relative ``margin`` of the best perplexity, the difference between them
is about the size of the sampling noise of those rows, so the choice is close to a coin toss. With
a margin, those candidates (the best included, in reference order) are scored again on every
calibration row (block and width rows together) and the lowest perplexity there wins (strict
``<``, the earlier candidate on a tie, as everywhere else).

Exactness where it is kept: the step's own bound gets the margin as slack, so every candidate
within the margin is scored in full and the set of near ties is the one exhaustive scoring finds.
The re-score itself uses the exact bound. The step's recorded perplexity stays the one on the
stage's own rows (the trajectory stays comparable); ``Step.near_ties`` records how many were
re-scored. With a margin of 0 (the default) nothing here runs and decisions are the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from models.decoder import CausalLM
from multipruner_jax.prune import step as step_lib
from multipruner_jax.runtime.scoring import Scorer, Slot


def within(ppl: Sequence[float | None], winner: int, margin: float) -> list[int]:
    """Candidates whose perplexity is at most ``(1 + margin)`` times the winner's, in order
    (stopped, NaN and infinite scores are never near ties)."""
    limit = ppl[winner] * (1.0 + margin)
    return [k for k, p in enumerate(ppl) if p is not None and math.isfinite(p) and p <= limit]


def choose(
    ppl: Sequence[float | None],
    winner: int,
    margin: float,
    scorer: Scorer,
    model: CausalLM,
    slots: Sequence[Slot],
    *,
    bound: bool,
) -> tuple[int, int]:
    """``(chosen candidate, near ties re-scored)``: ``winner`` when it has no near tie, else
    the near tie with the lowest perplexity on ``scorer``'s rows (scored from layer 0, since
    ``scorer``'s rows are not the step's)."""
    ties = within(ppl, winner, margin)
    if len(ties) < 2:
        return winner, 0
    fresh = [Slot(slots[k].masks, 0) for k in ties]
    outcome = step_lib.score_step(scorer, model, fresh, bound=bound)
    best = outcome.winner()
    if best is None:
        raise FloatingPointError("no near tie has a finite score on the larger calibration set")
    return ties[best], len(ties)
