"""The MultiPruner search: greedy removal of blocks, then MLP channel groups, then head groups.

Each step scores every candidate of the current stage on the current (already shrunk) model with
masks, removes the one with the lowest calibration perplexity (strict ``<``: ties go to the earlier
candidate, attention before MLP, lower layer first), and rebuilds a physically smaller model.
A stage loops while the parameter ratio is below its cumulative target.

Everything that differs between the stages lives in one table, ``STAGE_RULES``: which
candidates a stage offers and in which order, how removing one changes a layer and which masks
emulate it, the calibration set that scores it, whether a step uses a candidate up, how far the
stage can reach (``check_targets``) and its names in messages. The search loop, the replay, the
time estimate and the target checks read the table and never branch on a stage's name.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from models import masks as masks_lib
from models.decoder import CausalLM
from models.masks import Masks
from models.spec import LayerSpec, ModelSpec, count_params, pruned_ratio
from multipruner_jax.base.mesh import ShardingFor
from multipruner_jax.prune import near_ties, surgery
from multipruner_jax.prune import step as step_lib
from multipruner_jax.runtime.scoring import Scorer, Slot

Stage = Literal["block", "mlp_width", "attn_head"]
Kind = Literal["attn", "mlp"]


@dataclass(frozen=True)
class Settings:
    """Search knobs: ``target_ratio`` in percent, ``distribution`` normalised to sum 1;
    ``prefix_cache`` scores candidates from cached layer inputs, ``bound`` stops candidates
    that provably cannot win (both exact); ``near_tie`` > 0 re-scores the candidates within that
    relative margin of a step's best on every calibration row (``near_ties``; not the
    reference's rule)."""

    target_ratio: float
    distribution: tuple[float, float, float] = (0.44, 0.52, 0.04)
    mlp_group: int = 1024
    attn_group: int = 128
    prefix_cache: bool = True
    bound: bool = True
    near_tie: float = 0.0

    def stage_targets(self) -> tuple[float, float, float]:
        """Cumulative ratio targets ``T*a, T*(a+b), T``."""
        a, b, _ = self.distribution
        t = self.target_ratio
        return t * a, t * (a + b), t


def parse_distribution(text: str) -> tuple[float, float, float]:
    """``"44:52:4"`` -> ``(0.44, 0.52, 0.04)``; three non-negative numbers with a positive sum."""
    parts = text.split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 or not math.isfinite(v) for v in values) or sum(values) <= 0:
        raise ValueError(
            f"pruning distribution {text!r}: expected three non-negative numbers 'a:b:c' "
            "with a positive sum"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


def check_group_sizes(spec: ModelSpec, mlp_group: int, attn_group: int) -> None:
    """Raise ``ValueError`` unless the group sizes fit ``spec`` (the reference's assertions)."""
    if mlp_group <= 0 or spec.intermediate_size % mlp_group:
        raise ValueError(
            f"mlp_channel_group_size={mlp_group} must be a positive divisor of the MLP width "
            f"{spec.intermediate_size}"
        )
    unit = spec.head_dim * spec.q_per_kv
    if attn_group <= 0 or attn_group % unit:
        raise ValueError(
            f"attn_channel_group_size={attn_group} must be a positive multiple of head_dim x "
            f"query heads per KV head = {spec.head_dim} x {spec.q_per_kv} = {unit} "
            "(whole KV groups)"
        )


def _changed(spec: ModelSpec, layers: range | list[int], **change: Any) -> ModelSpec:
    """``spec`` with the ``LayerSpec`` fields in ``change`` set on ``layers``."""
    new = list(spec.layers)
    for i in layers:
        new[i] = dataclasses.replace(new[i], **change)
    return spec.replace_layers(new)


def _smallest_width(width: int, group: int) -> int:
    """The narrowest width a stage leaves: it removes ``group`` units while more would remain."""
    return (width - 1) % group + 1


def _kv_groups_per_step(spec: ModelSpec, settings: Settings) -> int:
    return settings.attn_group // (spec.head_dim * spec.q_per_kv)


@dataclass(frozen=True)
class Candidate:
    """One removal: a whole block (stage "block") or one group of a layer's width."""

    stage: Stage
    kind: Kind
    layer: int

    def describe(self) -> str:
        return f"{self.kind} {STAGE_RULES[self.stage].noun} of layer {self.layer}"


# The LayerSpec field that says whether a layer still has a block of each kind.
_BLOCK_FIELD: dict[Kind, str] = {"attn": "has_attn", "mlp": "has_mlp"}


@dataclass(frozen=True)
class BlockRule:
    """A stage that removes whole attention or MLP blocks, one per step."""

    title: str  # the stage in messages ("the block stage")
    noun: str  # what one candidate removes ("attn block of layer 3")
    calibration: str  # the calibration set that scores it: "block" or "width"
    kinds: tuple[Kind, ...]  # candidate kinds in the reference's order (every attention first)
    uses_up: bool = True  # a step removes one of the stage's candidates for good

    def offers(self, layer: LayerSpec, kind: Kind, spec: ModelSpec, settings: Settings) -> bool:
        """Whether ``layer`` of ``spec`` is a candidate of ``kind`` in this stage."""
        return getattr(layer, _BLOCK_FIELD[kind])

    def cut(self, layer: LayerSpec, kind: Kind, spec: ModelSpec, settings: Settings) -> LayerSpec:
        """``layer`` after one step of this stage removed its ``kind`` part."""
        return dataclasses.replace(layer, **{_BLOCK_FIELD[kind]: False})

    def mask(self, masks: Masks, kind: Kind, index: int, after: LayerSpec) -> Masks:
        """``masks`` with layer ``index`` switched to ``after`` (what ``cut`` left)."""
        return masks_lib.with_block_off(masks, kind, index)

    def floor(self, dense: ModelSpec, settings: Settings) -> tuple[ModelSpec, str]:
        """``dense`` with everything this stage can remove removed, and why it stops there."""
        every = range(dense.num_layers)
        gone = _changed(dense, every, has_attn=False, has_mlp=False)
        return gone, "every attention and MLP block removed"

    def single_steps(self, dense: ModelSpec, settings: Settings) -> list[ModelSpec]:
        """``dense`` after each possible single step (the most one step can overshoot)."""
        return [
            _changed(dense, [i], **{_BLOCK_FIELD[kind]: False})
            for i in range(dense.num_layers)
            for kind in self.kinds
        ]


@dataclass(frozen=True)
class WidthRule:
    """A stage that narrows one kind of block by a group of units per step, never to zero."""

    title: str
    noun: str
    calibration: str
    kind: Kind
    width: str  # the LayerSpec field it narrows
    dense_width: str  # the ModelSpec field holding that width in the dense model
    mask_axis: str  # the ``masks_lib.with_width`` axis that emulates the narrowing
    group: Callable[[ModelSpec, Settings], int]  # units removed per step
    flag: str  # the group-size flag, named when a target is out of reach
    setting: str  # the ``Settings`` field of that flag
    leaves: str  # what the narrowest layers keep: ``{least}`` and ``{full}`` filled in
    uses_up: bool = False

    @property
    def kinds(self) -> tuple[Kind, ...]:
        return (self.kind,)

    def offers(self, layer: LayerSpec, kind: Kind, spec: ModelSpec, settings: Settings) -> bool:
        narrower = getattr(self.cut(layer, kind, spec, settings), self.width)
        return getattr(layer, _BLOCK_FIELD[kind]) and narrower > 0

    def cut(self, layer: LayerSpec, kind: Kind, spec: ModelSpec, settings: Settings) -> LayerSpec:
        narrower = getattr(layer, self.width) - self.group(spec, settings)
        return dataclasses.replace(layer, **{self.width: narrower})

    def mask(self, masks: Masks, kind: Kind, index: int, after: LayerSpec) -> Masks:
        return masks_lib.with_width(masks, self.mask_axis, index, getattr(after, self.width))

    def floor(self, dense: ModelSpec, settings: Settings) -> tuple[ModelSpec, str]:
        full = getattr(dense, self.dense_width)
        least = _smallest_width(full, self.group(dense, settings))
        why = f"{self.flag}={getattr(settings, self.setting)} leaves " + self.leaves.format(
            least=least, full=full
        )
        return _changed(dense, range(dense.num_layers), **{self.width: least}), why

    def single_steps(self, dense: ModelSpec, settings: Settings) -> list[ModelSpec]:
        full, group = getattr(dense, self.dense_width), self.group(dense, settings)
        narrower = max(_smallest_width(full, group), full - group)
        return [_changed(dense, [0], **{self.width: narrower})]


# The three stages, in search order: everything a stage does differently is here.
STAGE_RULES: dict[Stage, BlockRule | WidthRule] = {
    "block": BlockRule(title="block", noun="block", calibration="block", kinds=("attn", "mlp")),
    "mlp_width": WidthRule(
        title="MLP-width",
        noun="channel group",
        calibration="width",
        kind="mlp",
        width="mlp_width",
        dense_width="intermediate_size",
        mask_axis="channels",
        group=lambda spec, settings: settings.mlp_group,
        flag="--mlp_channel_group_size",
        setting="mlp_group",
        leaves="every MLP at least {least} channels",
    ),
    "attn_head": WidthRule(
        title="attention-head",
        noun="head group",
        calibration="width",
        kind="attn",
        width="kv_groups",
        dense_width="num_key_value_heads",
        mask_axis="kv",
        group=_kv_groups_per_step,
        flag="--attn_channel_group_size",
        setting="attn_group",
        leaves="every attention block at least {least} of its {full} KV groups",
    ),
}
STAGES: tuple[Stage, ...] = tuple(STAGE_RULES)


def check_targets(dense: ModelSpec, settings: Settings) -> None:
    """Raise ``ValueError`` when a stage's cumulative target is out of its reach on ``dense``.

    Computed from the spec alone. Each bound is an upper limit whatever the earlier stages pick:
    a stage reaches at most what the earlier stages may have reached (their target plus the
    largest single step, by which a stage can overshoot) plus everything it can remove itself
    (every block; every MLP at its smallest width; every attention block at its last KV groups).
    A target above its bound cannot be met, so the run is refused before any weight is read.
    """
    total = count_params(dense)

    def removed(spec: ModelSpec) -> float:
        """Percent of ``dense``'s parameters that ``spec`` lacks."""
        return 100.0 * (total - count_params(spec)) / total

    reached = 0.0
    for rule, share, target in zip(
        STAGE_RULES.values(), settings.distribution, settings.stage_targets(), strict=True
    ):
        if share <= 0:
            continue
        floor, why = rule.floor(dense, settings)
        most = reached + removed(floor)
        if target > most:
            raise ValueError(
                f"--target_ratio={settings.target_ratio:g} with this --pruning_distribution asks "
                f"the {rule.title} stage to reach {target:.2f}% removed, but it can reach at most "
                f"{most:.2f}% ({why}); lower the target or change the distribution or group sizes"
            )
        overshoot = max(removed(spec) for spec in rule.single_steps(dense, settings))
        reached = max(reached, target + overshoot)


def candidates(stage: Stage, spec: ModelSpec, settings: Settings) -> list[Candidate]:
    """All candidates of ``stage`` on ``spec``, in the reference's order."""
    if stage not in STAGE_RULES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    rule = STAGE_RULES[stage]
    return [
        Candidate(stage, kind, i)
        for kind in rule.kinds
        for i, layer in enumerate(spec.layers)
        if rule.offers(layer, kind, spec, settings)
    ]


def remove(spec: ModelSpec, cand: Candidate, settings: Settings) -> ModelSpec:
    """``spec`` after removing ``cand``."""
    layers = list(spec.layers)
    rule = STAGE_RULES[cand.stage]
    layers[cand.layer] = rule.cut(layers[cand.layer], cand.kind, spec, settings)
    return spec.replace_layers(layers)


def candidate_masks(spec: ModelSpec, cand: Candidate, settings: Settings) -> Masks:
    """Masks on the current model that emulate removing ``cand``."""
    after = remove(spec, cand, settings).layers[cand.layer]
    return STAGE_RULES[cand.stage].mask(masks_lib.ones(spec), cand.kind, cand.layer, after)


@dataclass
class Step:
    """One accepted removal and what it cost."""

    step: int
    stage: Stage
    kind: Kind
    layer: int
    ppl: float
    ratio: float
    target: float
    candidates: int
    seconds: float
    compiles: int
    rows_skipped: float = 0.0  # share of the candidates' rows the bound left unscored
    near_ties: int = 0  # candidates re-scored on every calibration row (``--near_tie_margin``)

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.stage, self.kind, self.layer)


@dataclass(frozen=True)
class Shortfall:
    """A stage that ran out of candidates before its cumulative target."""

    stage: Stage
    ratio: float
    target: float

    def describe(self) -> str:
        return (
            f"the {self.stage} stage ran out of candidates at {self.ratio:.2f}% removed "
            f"(its target {self.target:.2f}%)"
        )


@dataclass
class SearchState:
    """Everything needed to resume: the accepted steps, in order (``shortfalls`` are found again
    when a resumed search replays, so they are not saved)."""

    steps: list[Step] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [dataclasses.asdict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchState:
        return cls([Step(**s) for s in d["steps"]])


def replay(state: SearchState, dense: ModelSpec, settings: Settings) -> ModelSpec:
    """The spec after ``state``'s steps on ``dense``; raises ``ValueError`` naming the first step
    that was not a candidate of its stage at that point (a state of another search)."""
    spec = dense
    for s in state.steps:
        if s.candidate not in candidates(s.stage, spec, settings):
            raise ValueError(
                f"step {s.step} removes {s.kind} ({s.stage}) of layer {s.layer}, which was not a "
                "candidate there"
            )
        spec = remove(spec, s.candidate, settings)
    return spec


class Progress:
    """Receives live search progress; the default prints nothing.

    ``eta`` is the rest of the current step; ``search_eta`` the rest of the whole search, an
    estimate (see ``remaining_seconds``).
    """

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
        pass

    def accepted(self, record: Step, search_eta: float) -> None:
        pass

    def exhausted(self, shortfall: Shortfall) -> None:
        pass


def remaining_seconds(
    spec: ModelSpec,
    dense: ModelSpec,
    settings: Settings,
    seconds_per_candidate: dict[Stage, float],
) -> float:
    """Estimated seconds until the search ends from ``spec``.

    Each remaining stage needs about ``(target - ratio) / (ratio one step removes)`` steps, the
    block stage's steps removing an average remaining block; a step scores every candidate of its
    stage (one fewer per step in the block stage) at the measured cost per candidate.
    """
    now = ratio = pruned_ratio(spec, dense)
    seconds = 0.0
    for stage, target in zip(STAGES, settings.stage_targets(), strict=True):
        cands = candidates(stage, spec, settings)
        if ratio >= target or not cands:
            continue
        # what one removal takes, measured on today's spec (later stages start from ``target``)
        deltas = [pruned_ratio(remove(spec, c, settings), dense) - now for c in cands]
        steps = math.ceil((target - ratio) / (sum(deltas) / len(deltas)))
        used_up = STAGE_RULES[stage].uses_up
        scored = sum(max(len(cands) - (k if used_up else 0), 1) for k in range(steps))
        seconds += scored * seconds_per_candidate[stage]
        ratio = target
    return seconds


def search(
    model: CausalLM,
    dense: ModelSpec,
    scorers: dict[str, Scorer],
    settings: Settings,
    state: SearchState | None = None,
    on_step: Callable[[SearchState, CausalLM], None] | None = None,
    progress: Progress | None = None,
    sharding_for: ShardingFor | None = None,
) -> tuple[CausalLM, SearchState]:
    """Run the three stages from ``state`` (replayed first) until ``settings.target_ratio``.

    ``model`` is the (reordered) dense model; ``scorers["block"]`` scores stage 1 and
    ``scorers["width"]`` stages 2 and 3; ``scorers["all"]`` (every calibration row) re-scores
    near ties when ``settings.near_tie`` > 0. ``on_step`` runs after every accepted removal.
    """
    state = state or SearchState()
    progress = progress or Progress()
    spec = replay(state, dense, settings)
    if state.steps:
        model = surgery.shrink(model, spec, sharding_for)
    per_candidate = _CostModel(scorers)
    ranks: dict[Candidate, float | None] = {}
    for stage, target in zip(STAGES, settings.stage_targets(), strict=True):
        scorer = scorers[scorer_for(stage)]
        while pruned_ratio(spec, dense) < target:
            cands = candidates(stage, spec, settings)
            if not cands:
                shortfall = Shortfall(stage, pruned_ratio(spec, dense), target)
                state.shortfalls.append(shortfall)
                progress.exhausted(shortfall)
                break
            start_time, start_compiles = time.perf_counter(), scorer.compiles.count
            ratio = pruned_ratio(spec, dense)
            later = remaining_seconds(
                remove(spec, cands[0], settings), dense, settings, per_candidate.estimates()
            )
            cache = scorer.prefix_cache(model) if settings.prefix_cache else None
            slots = [
                Slot(candidate_masks(spec, c, settings), c.layer if cache else 0) for c in cands
            ]
            done = _reporter(progress, stage, len(state.steps), len(cands), ratio, later)
            outcome = step_lib.score_step(
                scorer,
                model,
                slots,
                order=_best_first(cands, ranks, scorer.candidates) if settings.bound else None,
                bound=settings.bound,
                cache=cache,
                on_done=done,
                slack=settings.near_tie,
            )
            ranks = dict(zip(cands, outcome.ppl, strict=True))
            winner = outcome.winner()
            if winner is None:
                raise ValueError(
                    f"{stage} step {len(state.steps)}: no candidate has a finite calibration "
                    "perplexity: the model's activations overflow (inf or NaN) in its dtype; "
                    "expected finite scores (try --dtype=float32)"
                )
            ties = 0
            if settings.near_tie > 0:
                winner, ties = near_ties.choose(
                    outcome.ppl, winner, settings.near_tie, scorers["all"], model, slots,
                    bound=settings.bound,
                )  # fmt: skip
            best, best_ppl = cands[winner], outcome.ppl[winner]
            del cache
            spec = remove(spec, best, settings)
            model = surgery.shrink(model, spec, sharding_for)
            record = Step(
                step=len(state.steps),
                stage=stage,
                kind=best.kind,
                layer=best.layer,
                ppl=best_ppl,
                ratio=pruned_ratio(spec, dense),
                target=target,
                candidates=len(cands),
                seconds=time.perf_counter() - start_time,
                compiles=scorer.compiles.count - start_compiles,
                rows_skipped=outcome.skipped,
                near_ties=ties,
            )
            state.steps.append(record)
            per_candidate.measured(record)
            progress.accepted(
                record, remaining_seconds(spec, dense, settings, per_candidate.estimates())
            )
            if on_step is not None:
                on_step(state, model)
    return model, state


def _reporter(
    progress: Progress, stage: Stage, step: int, total: int, ratio: float, later: float
) -> Callable[[int, float], None]:
    """``on_done(finished, best_ppl)`` for ``score_step``: live progress with the step's ETA."""
    start = time.perf_counter()

    def done(finished: int, best: float) -> None:
        eta = (time.perf_counter() - start) / finished * (total - finished)
        progress.candidate(stage, step, finished, total, best, ratio, eta, eta + later)

    return done


def _best_first(
    cands: list[Candidate], ranks: dict[Candidate, float | None], first: int
) -> list[int]:
    """Candidate indices: the ``first`` that ranked best in the previous step (lowest
    perplexity; unscored, stopped or NaN ones rank last), then the rest in reference order.

    The best ones set a tight bound early; the rest keep the reference (layer) order, so a
    wave of candidate groups spans few layers.
    """

    def key(k: int) -> tuple[float, int]:
        ppl = ranks.get(cands[k])
        return (math.inf if ppl is None or math.isnan(ppl) else ppl, k)

    best = sorted(range(len(cands)), key=key)[:first]
    return best + [k for k in range(len(cands)) if k not in best]


def scorer_for(stage: Stage) -> str:
    """Which calibration set scores ``stage``: ``"block"`` or ``"width"``."""
    return STAGE_RULES[stage].calibration


class _CostModel:
    """Seconds per scored candidate, by calibration set: the last step's, or before a set was
    measured, the other set's scaled by their row counts."""

    def __init__(self, scorers: dict[str, Scorer]):
        self.rows = {name: scorer.rows.count for name, scorer in scorers.items()}
        self.seconds: dict[str, float] = {}

    def measured(self, step: Step) -> None:
        self.seconds[scorer_for(step.stage)] = step.seconds / step.candidates

    def estimates(self) -> dict[Stage, float]:
        per_row = [self.seconds[name] / self.rows[name] for name in self.seconds]
        fallback = sum(per_row) / len(per_row) if per_row else 0.0
        return {
            stage: self.seconds.get(scorer_for(stage), fallback * self.rows[scorer_for(stage)])
            for stage in STAGES
        }


def removal_orders(state: SearchState) -> tuple[list[int], list[int]]:
    """Layers whose attention / MLP block was removed, in removal order."""
    blocks = [s for s in state.steps if s.stage == "block"]
    return [s.layer for s in blocks if s.kind == "attn"], [
        s.layer for s in blocks if s.kind == "mlp"
    ]
