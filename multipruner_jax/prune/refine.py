"""Refinement after the greedy search (``--refine``): an exact local search of swaps at no lower
ratio.

Greedy removal never takes a decision back: a block removed early stays removed even when, after
later removals, another block would cost less. Refinement revisits the greedy result with moves
that keep the size: each move restores one removed *unit* and removes one kept unit.

* Units are what the greedy stages remove: an attention or MLP block, one MLP channel group of a
  layer, one head group (whole KV groups) of a layer; only the kinds whose stage has a share in
  ``--pruning_distribution`` take part (a ``...:0`` distribution never prunes heads here either).
  They are ``search.Candidate`` values, so removal, masks and parameter counts are the search's.
* A move pairs a removed unit ``r`` with a kept unit ``k`` of the same kind (attention block for
  attention block, channel group of layer i for one of layer j, ...) whose removal takes at least
  as many parameters as restoring ``r`` gives back; with ``cross_kind`` the two may be of
  different kinds under the same rule. So the parameter count never grows and the ratio never
  drops below the greedy result's (hence never below the target). A move never touches one
  sublayer twice (restoring a layer's MLP group while removing that layer's MLP block is no
  move).
* Each refinement step scores every move on every calibration row (block and width rows
  together: more tokens than either stage saw), applies the best one if it lowers the
  perplexity of the current configuration (strict ``<``; the earlier move in the fixed move
  order wins ties), and repeats until no move improves or the budget (moves scored, and/or
  seconds) runs out. The evaluation budget is checked per move and is deterministic (a step
  scores at most the moves left in the budget); the seconds budget is checked between steps.

Screening (``finalists``, off by default): an exact step costs every move on every row, which
on a real model is many times a greedy step (hundreds of moves, each from its lower layer on).
With ``finalists`` = K, a step first scores every move on a smaller scorer (the pipeline passes
the width rows) and then only the K best of those, in move order, on every row, as an exact step
does. The accepted move still lowers the every-row perplexity; what screening gives up is the
guarantee that it is the best move of the step (the selection EvoPress makes: cheap scores for
all, more tokens for the finalists).

Scoring reuses the search's engine. The moves that restore the same unit ``r`` share one model:
the dense (reordered) parameters shrunk to the current configuration plus ``r``; every move of
that group is a mask on it (``k`` switched off), scored side by side on the candidate axis. The
model differs from the current one only from ``r``'s layer on, so a move starts from the current
model's prefix cache at the lower of the two layers. The exact bound stops a move once it is
proven worse than the incumbent: the current configuration, then the best move found so far. So
refinement with the bound takes exactly the decisions it takes without it.

Every accepted move is a ``Move`` in ``RefineState``, saved with the search state and logged like
a greedy step; a resumed run replays the accepted moves and continues from there.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models import masks as masks_lib
from models.decoder import CausalLM
from models.spec import ModelSpec, count_params, pruned_ratio
from multipruner_jax.base.console import clock
from multipruner_jax.base.mesh import ShardingFor
from multipruner_jax.prune import search, surgery
from multipruner_jax.prune import step as step_lib
from multipruner_jax.runtime.scoring import PrefixCache, Scorer, Slot

Unit = search.Candidate


@dataclass(frozen=True)
class Budget:
    """Limits of a refinement: moves scored (``evaluations``) and ``seconds``; 0 = no limit."""

    evaluations: int = 0
    seconds: float = 0.0


_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(text: str) -> Budget:
    """``"500"`` (moves scored), ``"30m"`` / ``"900s"`` / ``"2h"`` (seconds), or both separated
    by a comma (``"500,30m"``); empty means no limit."""
    evaluations, seconds = 0, 0.0
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", part)
        if match is None or (not match[2] and "." in match[1]) or float(match[1]) <= 0:
            raise ValueError(
                f"--refine_budget={text!r}: expected moves to score ('500'), a time ('900s', "
                "'30m', '2h'), or both separated by a comma"
            )
        if match[2]:
            seconds = float(match[1]) * _UNITS[match[2]]
        else:
            evaluations = int(match[1])
    return Budget(evaluations, seconds)


@dataclass
class Move:
    """One accepted move: ``restore_*`` given back, ``remove_*`` taken, and what it cost."""

    step: int
    restore_stage: search.Stage
    restore_kind: search.Kind
    restore_layer: int
    remove_stage: search.Stage
    remove_kind: search.Kind
    remove_layer: int
    before: float  # calibration perplexity (every row) of the configuration before the move
    ppl: float  # ... and after it
    ratio: float
    candidates: int  # moves scored in this step
    seconds: float
    compiles: int
    rows_skipped: float = 0.0  # of the moves scored on every row
    finalists: int = 0  # moves scored on every row after screening (0: no screening)

    @property
    def restored(self) -> Unit:
        return Unit(self.restore_stage, self.restore_kind, self.restore_layer)

    @property
    def removed(self) -> Unit:
        return Unit(self.remove_stage, self.remove_kind, self.remove_layer)

    def describe(self) -> str:
        return f"restore {self.restored.describe()}, remove {self.removed.describe()}"


@dataclass
class RefineState:
    """The accepted moves, in order, plus how the last run of the refinement ended
    (``stopped``: "no improving move" or "budget"; ``evaluations``: moves scored in total,
    including the last step that found no improving move)."""

    moves: list[Move] = field(default_factory=list)
    stopped: str = ""
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"moves": [dataclasses.asdict(m) for m in self.moves]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefineState:
        moves = [Move(**m) for m in d["moves"]]
        return cls(moves, evaluations=sum(m.candidates for m in moves))


def kinds(settings: search.Settings) -> list[tuple[search.Stage, search.Kind]]:
    """The unit kinds taking part: those whose stage has a share in the distribution."""
    a, b, c = settings.distribution
    out: list[tuple[search.Stage, search.Kind]] = []
    if a > 0:
        out += [("block", "attn"), ("block", "mlp")]
    if b > 0:
        out.append(("mlp_width", "mlp"))
    if c > 0:
        out.append(("attn_head", "attn"))
    return out


def _kv_step(spec: ModelSpec, settings: search.Settings) -> int:
    return settings.attn_group // (spec.head_dim * spec.q_per_kv)


def removed_units(spec: ModelSpec, dense: ModelSpec, settings: search.Settings) -> list[Unit]:
    """Units of ``dense`` that ``spec`` lacks and could give back, in candidate order."""
    out = []
    for stage, kind in kinds(settings):
        for i, (now, full) in enumerate(zip(spec.layers, dense.layers, strict=True)):
            if stage == "block":
                gone = not (now.has_attn if kind == "attn" else now.has_mlp)
            elif stage == "mlp_width":
                gone = now.has_mlp and now.mlp_width < full.mlp_width
            else:
                gone = now.has_attn and now.kv_groups < full.kv_groups
            if gone:
                out.append(Unit(stage, kind, i))
    return out


def kept_units(spec: ModelSpec, settings: search.Settings) -> list[Unit]:
    """Units ``spec`` could still lose: the greedy stages' candidates, in their order."""
    stages = dict.fromkeys(stage for stage, _ in kinds(settings))
    return [u for stage in stages for u in search.candidates(stage, spec, settings)]


def restore(spec: ModelSpec, unit: Unit, settings: search.Settings) -> ModelSpec:
    """``spec`` with the removed ``unit`` given back."""
    layers = list(spec.layers)
    layer = layers[unit.layer]
    if unit.stage == "block":
        change = {"has_attn" if unit.kind == "attn" else "has_mlp": True}
    elif unit.stage == "mlp_width":
        change = {"mlp_width": layer.mlp_width + settings.mlp_group}
    else:
        change = {"kv_groups": layer.kv_groups + _kv_step(spec, settings)}
    layers[unit.layer] = dataclasses.replace(layer, **change)
    return spec.replace_layers(layers)


def moves(
    spec: ModelSpec, dense: ModelSpec, settings: search.Settings, cross_kind: bool = False
) -> list[tuple[Unit, Unit]]:
    """Every ``(restore, remove)`` move from ``spec``, grouped by the unit restored, in order."""
    size = count_params(spec)
    out = []
    kept = kept_units(spec, settings)
    for r in removed_units(spec, dense, settings):
        grown = restore(spec, r, settings)
        for k in kept:
            same_kind = (k.stage, k.kind) == (r.stage, r.kind)
            if not (same_kind or cross_kind) or (k.layer, k.kind) == (r.layer, r.kind):
                continue
            if count_params(search.remove(grown, k, settings)) <= size:
                out.append((r, k))
    return out


def apply(spec: ModelSpec, move: tuple[Unit, Unit], settings: search.Settings) -> ModelSpec:
    """``spec`` after ``move``."""
    r, k = move
    return search.remove(restore(spec, r, settings), k, settings)


def replay(state: RefineState, spec: ModelSpec, dense: ModelSpec, settings: search.Settings):
    """The spec after ``state``'s moves on the greedy result ``spec``; ``ValueError`` names the
    first move that was no move there (a state of another refinement)."""
    for m in state.moves:
        move = (m.restored, m.removed)
        if move not in moves(spec, dense, settings, cross_kind=True):
            raise ValueError(f"refine move {m.step} ({m.describe()}) was not a move there")
        spec = apply(spec, move, settings)
    return spec


def removal_orders(greedy: search.SearchState, state: RefineState) -> tuple[list[int], list[int]]:
    """Layers whose attention / MLP block is removed, in removal order (greedy, then moves)."""
    attn, mlp = search.removal_orders(greedy)
    for m in state.moves:
        for unit, add in ((m.restored, False), (m.removed, True)):
            if unit.stage == "block":
                order = attn if unit.kind == "attn" else mlp
                if add:
                    order.append(unit.layer)
                else:
                    order.remove(unit.layer)
    return attn, mlp


def score_current(scorer: Scorer, model: CausalLM, cache: PrefixCache | None) -> float:
    """The calibration perplexity of ``model`` itself, computed as candidates' are."""
    start = model.spec.num_layers - 1 if cache is not None else 0
    slot = Slot(masks_lib.ones(model.spec), start)
    ppl = step_lib.score_step(scorer, model, [slot], bound=False, cache=cache).ppl[0]
    assert ppl is not None
    return ppl


def refine(
    dense_model: CausalLM,
    greedy: ModelSpec,
    dense: ModelSpec,
    scorer: Scorer,
    settings: search.Settings,
    *,
    budget: Budget = Budget(),
    cross_kind: bool = False,
    state: RefineState | None = None,
    screen: Scorer | None = None,
    finalists: int = 0,
    on_move: Callable[[RefineState, CausalLM], None] | None = None,
    say: Callable[[str], None] = lambda text: None,
    status: Callable[[str], None] = lambda text: None,
    sharding_for: ShardingFor | None = None,
) -> tuple[CausalLM, RefineState]:
    """Refine the greedy result ``greedy`` (a spec of ``dense``) from ``state`` (replayed first).

    ``dense_model`` is the dense model the search started from (reordered when it was);
    ``scorer`` holds every calibration row; ``settings`` are the search's (group sizes, the
    distribution's kinds, prefix cache and bound). ``on_move`` runs after every accepted move;
    ``say`` gets a line per step, ``status`` a progress line as a step's moves are scored.
    With ``screen`` (a scorer of fewer rows) and ``finalists`` > 0, a step scores every move on
    ``screen``'s rows first (no bound: every score is needed to rank), then only the
    ``finalists`` best of them, in move order, on ``scorer``'s rows, as an exact step would.
    """
    state = state or RefineState()
    spec = replay(state, greedy, dense, settings)
    model = surgery.shrink(dense_model, spec, sharding_for)
    spent, started = state.evaluations, time.perf_counter()
    screening = screen is not None and finalists > 0
    while True:
        if budget.seconds and time.perf_counter() - started >= budget.seconds:
            state.stopped = "budget"
            break
        todo = moves(spec, dense, settings, cross_kind)
        if budget.evaluations:
            if spent >= budget.evaluations:
                state.stopped = "budget"
                break
            todo = todo[: budget.evaluations - spent]
        t0, compiles = time.perf_counter(), scorer.compiles.count
        cache = scorer.prefix_cache(model) if settings.prefix_cache else None
        before = score_current(scorer, model, cache)
        exact = todo
        if screening and len(todo) > finalists:
            screen_cache = screen.prefix_cache(model) if settings.prefix_cache else None
            screened, _ = _score_moves(
                screen,
                dense_model,
                spec,
                todo,
                screen_cache,
                settings,
                sharding_for,
                bound=False,
                on_group=_progress(status, len(state.moves), "screened", len(todo)),
            )
            ranked = sorted(range(len(todo)), key=lambda i: (_finite(screened[i]), i))
            exact = [todo[i] for i in sorted(ranked[:finalists])]
        ppls, rows = _score_moves(
            scorer,
            dense_model,
            spec,
            exact,
            cache,
            settings,
            sharding_for,
            bound=settings.bound,
            beat=before,
            on_group=_progress(status, len(state.moves), "scored", len(exact)),
        )
        best, best_ppl = None, before
        for move, ppl in zip(exact, ppls, strict=True):
            if ppl is not None and ppl < best_ppl:  # strict: the earlier move wins ties
                best, best_ppl = move, ppl
        scored = len(todo)
        spent += scored
        state.evaluations = spent
        if best is None:
            state.stopped = "no improving move"
            say(f"refine: no move improves {before:.4f} ({_scored(scored, exact, screening)})")
            break
        spec = apply(spec, best, settings)
        model = surgery.shrink(dense_model, spec, sharding_for)
        r, k = best
        move = Move(
            step=len(state.moves),
            restore_stage=r.stage,
            restore_kind=r.kind,
            restore_layer=r.layer,
            remove_stage=k.stage,
            remove_kind=k.kind,
            remove_layer=k.layer,
            before=before,
            ppl=best_ppl,
            ratio=pruned_ratio(spec, dense),
            candidates=scored,
            seconds=time.perf_counter() - t0,
            compiles=scorer.compiles.count - compiles,
            rows_skipped=1.0 - rows / (len(exact) * scorer.rows.count),
            finalists=len(exact) if screening else 0,
        )
        state.moves.append(move)
        say(
            f"refine move {move.step}: {move.describe()}: {before:.4f} -> {best_ppl:.4f} "
            f"({_scored(scored, exact, screening)}, {move.seconds:.1f}s)"
        )
        if on_move is not None:
            on_move(state, model)
    return model, state


def _score_moves(
    scorer: Scorer,
    dense_model: CausalLM,
    spec: ModelSpec,
    todo: list[tuple[Unit, Unit]],
    cache: PrefixCache | None,
    settings: search.Settings,
    sharding_for: ShardingFor | None,
    *,
    bound: bool,
    beat: float = math.inf,
    on_group: Callable[[int], None] = lambda done: None,
) -> tuple[list[float | None], int]:
    """The perplexity of every move of ``todo`` on ``scorer``'s rows (``None`` where the bound
    proved it no better than ``beat`` or an earlier move), and the rows scored in all.

    The moves restoring one unit share one model (``spec`` plus that unit), each a mask on it.
    """
    ppls: list[float | None] = []
    rows = 0
    for restored, group in itertools.groupby(todo, key=lambda move: move[0]):
        removals = [k for _, k in group]
        grown = surgery.shrink(dense_model, restore(spec, restored, settings), sharding_for)
        slots = [
            Slot(
                search.candidate_masks(grown.spec, k, settings),
                min(restored.layer, k.layer) if cache is not None else 0,
            )
            for k in removals
        ]
        outcome = step_lib.score_step(
            scorer,
            grown,
            slots,
            bound=bound,
            cache=None if cache is None else PrefixCache(grown, cache.inputs),
            beat=beat,
        )
        rows += sum(outcome.rows)
        ppls += outcome.ppl
        beat = min([beat] + [_finite(p) for p in outcome.ppl])
        on_group(len(ppls))
    return ppls, rows


def _progress(
    status: Callable[[str], None], step: int, phase: str, total: int
) -> Callable[[int], None]:
    """A callback showing ``done`` of ``total`` moves of this phase and the time it has left."""
    started = time.perf_counter()

    def show(done: int) -> None:
        left = (time.perf_counter() - started) / done * (total - done)
        status(f"refine step {step}: {phase} {done}/{total} moves, {clock(left)} left")

    return show


def _finite(ppl: float | None) -> float:
    """``ppl`` for ranking: a stopped (``None``) or NaN score ranks last."""
    return math.inf if ppl is None or math.isnan(ppl) else ppl


def _scored(scored: int, exact: list, screening: bool) -> str:
    if not screening:
        return f"{scored} moves scored"
    return f"{scored} moves screened, {len(exact)} finalists scored on every row"
