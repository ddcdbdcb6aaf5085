"""The MultiPruner search: greedy removal of blocks, then MLP channel groups, then head groups.

Each step scores every candidate of the current stage on the current (already shrunk) model with
masks, removes the one with the lowest calibration perplexity (strict ``<``: ties go to the earlier
candidate, attention before MLP, lower layer first), and rebuilds a physically smaller model.
A stage loops while the parameter ratio is below its cumulative target.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from models import masks as masks_lib
from models.decoder import CausalLM
from models.masks import Masks
from models.spec import ModelSpec, pruned_ratio
from multipruner_jax import surgery
from multipruner_jax.mesh import ShardingFor
from multipruner_jax.scoring import Scorer

Stage = Literal["block", "mlp_width", "attn_head"]
Kind = Literal["attn", "mlp"]
STAGES: tuple[Stage, ...] = get_args(Stage)


@dataclass(frozen=True)
class Settings:
    """Search knobs: ``target_ratio`` in percent, ``distribution`` normalised to sum 1."""

    target_ratio: float
    distribution: tuple[float, float, float] = (0.44, 0.52, 0.04)
    mlp_group: int = 1024
    attn_group: int = 128
    prefix_cache: bool = True

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


@dataclass(frozen=True)
class Candidate:
    """One removal: a whole block (stage "block") or one group of a layer's width."""

    stage: Stage
    kind: Kind
    layer: int

    def describe(self) -> str:
        what = {"block": "block", "mlp_width": "channel group", "attn_head": "head group"}
        return f"{self.kind} {what[self.stage]} of layer {self.layer}"


def candidates(stage: Stage, spec: ModelSpec, settings: Settings) -> list[Candidate]:
    """All candidates of ``stage`` on ``spec``, in the reference's order."""
    layers = list(enumerate(spec.layers))
    if stage == "block":
        return [Candidate(stage, "attn", i) for i, layer in layers if layer.has_attn] + [
            Candidate(stage, "mlp", i) for i, layer in layers if layer.has_mlp
        ]
    if stage == "mlp_width":
        return [
            Candidate(stage, "mlp", i)
            for i, layer in layers
            if layer.has_mlp and layer.mlp_width - settings.mlp_group > 0
        ]
    groups = _kv_groups_per_step(spec, settings)
    return [
        Candidate(stage, "attn", i)
        for i, layer in layers
        if layer.has_attn and layer.kv_groups - groups > 0
    ]


def _kv_groups_per_step(spec: ModelSpec, settings: Settings) -> int:
    return settings.attn_group // (spec.head_dim * spec.q_per_kv)


def remove(spec: ModelSpec, cand: Candidate, settings: Settings) -> ModelSpec:
    """``spec`` after removing ``cand``."""
    layers = list(spec.layers)
    layer = layers[cand.layer]
    if cand.stage == "block":
        field_name = "has_attn" if cand.kind == "attn" else "has_mlp"
        layers[cand.layer] = dataclasses.replace(layer, **{field_name: False})
    elif cand.stage == "mlp_width":
        layers[cand.layer] = dataclasses.replace(
            layer, mlp_width=layer.mlp_width - settings.mlp_group
        )
    else:
        layers[cand.layer] = dataclasses.replace(
            layer, kv_groups=layer.kv_groups - _kv_groups_per_step(spec, settings)
        )
    return spec.replace_layers(layers)


def candidate_masks(spec: ModelSpec, cand: Candidate, settings: Settings) -> Masks:
    """Masks on the current model that emulate removing ``cand``."""
    masks = masks_lib.ones(spec)
    after = remove(spec, cand, settings).layers[cand.layer]
    if cand.stage == "block":
        return masks_lib.with_block_off(masks, cand.kind, cand.layer)
    if cand.stage == "mlp_width":
        return masks_lib.with_width(masks, "channels", cand.layer, after.mlp_width)
    return masks_lib.with_width(masks, "kv", cand.layer, after.kv_groups)


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

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.stage, self.kind, self.layer)


@dataclass
class SearchState:
    """Everything needed to resume: the accepted steps, in order."""

    steps: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [dataclasses.asdict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchState:
        return cls([Step(**s) for s in d["steps"]])

    def spec(self, base: ModelSpec, settings: Settings) -> ModelSpec:
        """Replay the accepted steps on ``base``."""
        for s in self.steps:
            base = remove(base, s.candidate, settings)
        return base


class Progress:
    """Receives live search progress; the default prints nothing."""

    def candidate(
        self, stage: Stage, step: int, done: int, total: int, best: float, ratio: float, eta: float
    ) -> None:
        pass

    def accepted(self, record: Step) -> None:
        pass


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
    ``scorers["width"]`` stages 2 and 3. ``on_step`` runs after every accepted removal.
    """
    state = state or SearchState()
    progress = progress or Progress()
    spec = state.spec(dense, settings)
    if state.steps:
        model = surgery.shrink(model, spec, sharding_for)
    for stage, target in zip(STAGES, settings.stage_targets(), strict=True):
        scorer = scorers["block" if stage == "block" else "width"]
        while pruned_ratio(spec, dense) < target:
            cands = candidates(stage, spec, settings)
            if not cands:
                break
            start_time, start_compiles = time.perf_counter(), scorer.compiles.count
            ratio = pruned_ratio(spec, dense)
            cache = scorer.prefix_cache(model) if settings.prefix_cache else None
            best, best_ppl = None, math.inf
            for j, cand in enumerate(cands):
                masks = candidate_masks(spec, cand, settings)
                start = None if cache is None else cache.start_at(cand.layer)
                ppl = scorer.perplexity(model, masks, start)
                if ppl < best_ppl:
                    best, best_ppl = cand, ppl
                elapsed = time.perf_counter() - start_time
                eta = elapsed / (j + 1) * (len(cands) - j - 1)
                progress.candidate(stage, len(state.steps), j + 1, len(cands), best_ppl, ratio, eta)
            if best is None:
                raise FloatingPointError(f"{stage} step {len(state.steps)}: every score was NaN")
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
            )
            state.steps.append(record)
            progress.accepted(record)
            if on_step is not None:
                on_step(state, model)
    return model, state


def removal_orders(state: SearchState) -> tuple[list[int], list[int]]:
    """Layers whose attention / MLP block was removed, in removal order."""
    blocks = [s for s in state.steps if s.stage == "block"]
    return [s.layer for s in blocks if s.kind == "attn"], [
        s.layer for s in blocks if s.kind == "mlp"
    ]
