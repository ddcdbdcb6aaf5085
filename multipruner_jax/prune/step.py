"""Scores of one search step: every candidate, in waves over the candidate axis, with an exact
branch and bound.

A wave scores one batch of ``scorer.rows`` (``rows.Rows``) for up to ``scorer.candidates``
candidates side by side. Each group of devices keeps its candidate until the candidate has seen
every batch (it joins at whatever batch the wave is on and wraps around), or until the bound
proves it cannot win; then the group takes the next candidate in ``order``. A candidate's
perplexity is computed from its per-row values in row order, exactly as ``Scorer.perplexity``
does, so a fully scored candidate gets the very same number however its rows were scheduled.

The bound. A row's mean NLL is (up to fp32 rounding, see ``FLOOR``) non-negative, so the mean
over all rows is at least the sum of the rows seen so far divided by the row count. A candidate
whose lower bound is above the best complete candidate's mean by a safety margin (``EPS``, far
above float64 rounding of the sums and of ``exp``) has a strictly larger perplexity, so it loses
under the reference's strict ``<`` whatever its position in the reference order: it is not
scored further. A NaN or infinite partial sum can never win either. The winner, and the
perplexity reported for it, are therefore exactly those of exhaustive scoring.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.decoder import CausalLM
from multipruner_jax.runtime.scoring import PrefixCache, Scorer, Slot

# The lowest value a row's mean NLL can take. Each target's NLL is ``logsumexp - logit`` in fp32,
# mathematically >= 0; XLA's rounding of ``exp(0)`` and ``log`` can leave it about 1e-7 below.
FLOOR = 1e-5
# Relative and absolute margin of the bound: far above the float64 rounding of a sum of up to
# millions of row means, and large enough that ``exp`` of two means this far apart differs.
EPS = 1e-9


def lower_bound(partial: float, known: int, rows: int) -> float:
    """A lower bound on the mean row NLL of a candidate whose ``known`` rows (of ``rows``) sum to
    ``partial``, as computed in float64 over all rows."""
    low = partial - (rows - known) * FLOOR
    return (low - abs(low) * EPS) / rows


def cannot_win(partial: float, known: int, rows: int, best_mean: float) -> bool:
    """True when a candidate with this partial sum surely ends with a larger perplexity than a
    complete candidate of mean row NLL ``best_mean`` (NaN and infinite partial sums never win)."""
    if not math.isfinite(partial):
        return True
    return lower_bound(partial, known, rows) > best_mean + EPS * max(1.0, abs(best_mean))


@dataclass
class Outcome:
    """One step's scores in the candidates' (reference) order.

    ``ppl[k]``: perplexity of candidate ``k``, or ``None`` when the bound stopped it;
    ``rows[k]``: the rows it was scored on; ``total_rows``: rows of one full score.
    """

    ppl: list[float | None]
    rows: list[int]
    total_rows: int

    def winner(self) -> int | None:
        """The reference rule: the lowest perplexity by strict ``<`` in reference order (NaN
        and infinity never win); ``None`` when no candidate has a finite score."""
        best, best_ppl = None, math.inf
        for k, ppl in enumerate(self.ppl):
            if ppl is not None and ppl < best_ppl:
                best, best_ppl = k, ppl
        return best

    @property
    def skipped(self) -> float:
        """Share of candidate rows that the bound left unscored."""
        total = self.total_rows * len(self.rows)
        return 1.0 - sum(self.rows) / total if total else 0.0


def score_step(
    scorer: Scorer,
    model: CausalLM,
    slots: Sequence[Slot],
    *,
    order: Sequence[int] | None = None,
    bound: bool = True,
    cache: PrefixCache | None = None,
    on_done: Callable[[int, float], None] | None = None,
    beat: float = math.inf,
    slack: float = 0.0,
) -> Outcome:
    """Score every candidate ``slots[k]`` (masks and first layer) on all of ``scorer.rows``.

    ``order``: the order in which candidates get a device group (best-first makes the bound
    prune sooner); ``bound``: stop candidates that cannot win; ``cache``: the prefix cache that
    starts after layer 0 read from; ``on_done(finished, best_ppl)`` after each candidate ends.
    ``beat``: a perplexity scored elsewhere (an incumbent) that a candidate must beat, so the
    bound stops candidates proven above it too; ``slack``: a relative margin, so the bound only
    stops candidates proven more than ``1 + slack`` times the best (near ties get full scores).
    """
    data = scorer.rows
    data.check_counted()
    n, rows, batches = len(slots), data.count, len(data)
    order = range(n) if order is None else order
    if sorted(order) != list(range(n)):
        raise ValueError(f"order {list(order)} is not a permutation of {n} candidates")
    means = np.zeros((n, rows))
    partial = np.zeros(n)
    known = np.zeros(n, np.int64)
    left = np.full(n, batches)
    ppl: list[float | None] = [None] * n
    queue = deque(order)
    groups: list[int | None] = [None] * scorer.candidates
    best_mean, best_ppl, finished, wave = math.inf, math.inf, 0, 0
    if math.isfinite(beat):
        best_mean, best_ppl = math.log(beat), beat
    margin = math.log1p(slack)

    def finish(group: int) -> None:
        nonlocal finished
        groups[group] = None
        finished += 1
        if on_done is not None:
            on_done(finished, best_ppl)

    while queue or any(k is not None for k in groups):
        groups = [queue.popleft() if k is None and queue else k for k in groups]
        batch = wave % batches
        wave += 1
        out = scorer.wave(model, [None if k is None else slots[k] for k in groups], batch, cache)
        real = data.spans[batch]
        for group, k in enumerate(groups):
            if k is None:
                continue
            row_means = out[group] / data.counts[real]
            if np.any(row_means < -FLOOR):
                raise FloatingPointError(f"candidate {k}: a row's mean NLL is negative")
            means[k, real.start : real.stop] = row_means
            partial[k] += row_means.sum()
            known[k] += len(real)
            left[k] -= 1
            if left[k] == 0:
                mean = float(np.mean(means[k]))
                with np.errstate(over="ignore"):  # an overflowing model scores inf
                    ppl[k] = float(np.exp(mean))
                if mean < best_mean:
                    best_mean, best_ppl = mean, min(best_ppl, ppl[k])
                finish(group)
        if bound:
            for group, k in enumerate(groups):
                if k is not None and cannot_win(
                    partial[k], int(known[k]), rows, best_mean + margin
                ):
                    finish(group)
    return Outcome(ppl, [int(r) for r in known], rows)
