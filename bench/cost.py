"""Matmul FLOPs of scoring, counted from shapes: what a search executes, and its projections.

Counted: every matrix product of a decoder layer (q/k/v/o projections, attention scores and
weighted values over the full ``seq x seq`` square, as XLA's fused kernel and torch's sdpa
compute them at these lengths, gate/up/down projections) and of the LM head, 2 FLOPs per
multiply-add. Not counted: norms, RoPE, softmax, the cross-entropy's exp/log (together well under
1 % of a forward at these sizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.masks import Masks
from models.spec import LayerSpec, ModelSpec


def attention_flops(spec: ModelSpec, kv_groups: int, rows: int, seq: int) -> float:
    """One attention block with ``kv_groups`` KV groups on ``rows x seq`` tokens."""
    d, hd = spec.hidden_size, spec.head_dim
    q = kv_groups * spec.q_per_kv * hd
    kv = kv_groups * hd
    projections = 2 * d * (2 * q + 2 * kv)  # q, o and k, v
    scores = 2 * 2 * seq * q  # q k^T and p v over every key
    return float(rows * seq * (projections + scores))


def mlp_flops(spec: ModelSpec, width: int, rows: int, seq: int) -> float:
    """One SwiGLU MLP of ``width`` channels."""
    return float(rows * seq * 2 * 3 * spec.hidden_size * width)


def layer_flops(spec: ModelSpec, layer: LayerSpec, rows: int, seq: int) -> float:
    """A whole decoder layer as its spec has it (removed blocks cost nothing)."""
    attn = attention_flops(spec, layer.kv_groups, rows, seq) if layer.has_attn else 0.0
    mlp = mlp_flops(spec, layer.mlp_width, rows, seq) if layer.has_mlp else 0.0
    return attn + mlp


def head_flops(spec: ModelSpec, rows: int, seq: int) -> float:
    """The LM head's logits for every position."""
    return float(rows * seq * 2 * spec.hidden_size * spec.vocab_size)


def forward_flops(spec: ModelSpec, rows: int, seq: int, first: int = 0, head: bool = True) -> float:
    """Layers ``first..L-1`` (and the head) of ``spec``."""
    layers = sum(layer_flops(spec, layer, rows, seq) for layer in spec.layers[first:])
    return layers + (head_flops(spec, rows, seq) if head else 0.0)


def masked_flops(
    spec: ModelSpec, masks: Masks, rows: int, seq: int, first: int = 0, skip: bool = True
) -> float:
    """What our engine executes for one masked candidate from layer ``first``: masked KV groups
    and channels are still computed (masks multiply), a block whose mask is 0 is skipped when
    ``skip`` (else computed and discarded)."""
    total = head_flops(spec, rows, seq)
    for i, layer in enumerate(spec.layers[first:], start=first):
        if layer.has_attn and (masks.attn[i] != 0 or not skip):
            total += attention_flops(spec, layer.kv_groups, rows, seq)
        if layer.has_mlp and (masks.mlp[i] != 0 or not skip):
            total += mlp_flops(spec, layer.mlp_width, rows, seq)
    return total


@dataclass(frozen=True)
class StageWork:
    """One stage of a projected search: ``evaluations`` candidate scores (and ``steps`` prefix
    cache passes) on ``rows`` rows of ``seq`` tokens."""

    name: str
    steps: int
    evaluations: int
    rows: int


@dataclass(frozen=True)
class Projection:
    """FLOPs of a projected search and its time on ``chips`` at ``peak x utilisation`` FLOP/s."""

    engine_flops: float  # ours: prefix cache, masked widths computed, lock-step waves
    reference_flops: float  # the reference loop: a full forward of the pruned model per candidate
    seconds: float
    reference_seconds: float  # the reference on one chip (its device_map=auto runs one at a time)
    busy: float  # share of the chips' time spent on the engine's own work (the rest: lock step)


def project(
    spec: ModelSpec,
    stages: Sequence[StageWork],
    seq: int,
    *,
    chips: int,
    candidate_groups: int,
    peak: float,
    utilisation: float,
) -> Projection:
    """Project a search on ``spec`` (dense shapes, so an upper bound as the model shrinks).

    A stage's candidates are spread evenly over the layers; every step runs one prefix-cache pass
    (its rows shared out among the groups) and scores its candidates in waves of
    ``candidate_groups``, the waves taking consecutive layers. A wave costs what its lowest-layer
    candidate computes (the groups run in lock step) and each group holds
    ``chips / candidate_groups`` chips, all assumed to reach ``utilisation`` of ``peak``. The
    reference scores each candidate with a full forward.
    """
    layers = spec.num_layers
    engine = reference = group_work = 0.0
    for stage in stages:
        per_step = max(1, round(stage.evaluations / stage.steps))
        starts = np.floor(np.arange(per_step) * layers / per_step).astype(int)
        cache = stage.steps * forward_flops(spec, stage.rows, seq, head=False)
        candidates = sum(forward_flops(spec, stage.rows, seq, first=int(s)) for s in starts)
        waves = sum(
            forward_flops(spec, stage.rows, seq, first=int(starts[i]))
            for i in range(0, per_step, candidate_groups)
        )
        # the prefix pass spreads its rows over the groups
        spread = stage.steps * forward_flops(
            spec, math.ceil(stage.rows / candidate_groups), seq, head=False
        )
        engine += cache + stage.steps * candidates
        group_work += spread + stage.steps * waves  # what one group computes, in lock step
        reference += stage.evaluations * forward_flops(spec, stage.rows, seq)
    rate = peak * utilisation
    return Projection(
        engine_flops=engine,
        reference_flops=reference,
        seconds=group_work / (chips / candidate_groups * rate),
        reference_seconds=reference / rate,
        busy=engine / (group_work * candidate_groups),
    )


def rough_duration(seconds: float) -> str:
    """``h:mm`` (or ``m:ss`` under an hour)."""
    if seconds < 3600 - 0.5:
        seconds = int(round(seconds))
        return f"{seconds // 60}:{seconds % 60:02d} min"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}:{minutes % 60:02d} h"
