"""The exact branch and bound: same winner and perplexity as exhaustive scoring, with exact ties,
NaN candidates and any scoring order; and a switched-off block is skipped, not computed."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from models import masks as masks_lib
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.prune import search, step, surgery
from multipruner_jax.runtime.scoring import Scorer, Slot

FAMILY = "llama_mha"


def _scorer(rows: int = 6, shape=(1, 1, 1), seed: int = 1) -> Scorer:
    mesh = mesh_lib.make_mesh(shape)
    return Scorer(tiny_models.tokens(rows, 16, seed=seed), ignore_id=3, batch_size=1, mesh=mesh)


def test_the_bound_needs_a_strict_margin():
    rows = 10
    best = 2.0  # mean row NLL of the best complete candidate: its rows sum to 20
    assert not step.cannot_win(20.0, rows, rows, best)  # an exact tie may still win
    assert not step.cannot_win(19.0, 9, rows, best)
    assert not step.cannot_win(20.0 + 1e-9, 9, rows, best)  # within rounding: keep scoring
    assert step.cannot_win(20.001, 9, rows, best)
    assert step.cannot_win(math.nan, 1, rows, best) and step.cannot_win(math.inf, 1, rows, best)
    assert not step.cannot_win(1e6, 1, rows, math.inf)  # nothing complete yet
    assert step.lower_bound(20.0, rows, rows) <= 2.0
    assert step.lower_bound(0.0, 0, rows) < 0.0  # rounding can put a row a hair below zero


def test_the_winner_rule_is_strict_and_skips_nan_and_infinity():
    outcome = step.Outcome([math.nan, 3.0, None, 2.0, 2.0, math.inf], [4, 4, 1, 4, 4, 4], 4)
    assert outcome.winner() == 3
    assert step.Outcome([math.nan, math.inf, None], [4, 4, 1], 4).winner() is None
    assert outcome.skipped == pytest.approx(3 / 24)


def _zero_blocks(model):
    """Every block's output projection zeroed: removing any block changes nothing."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    return model


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 1, 1)])
def test_exact_ties_go_to_the_earliest_candidate_whatever_the_order(shape):
    model = _zero_blocks(tiny_models.model(FAMILY))
    settings = search.Settings(5.0, (1.0, 0.0, 0.0), 32, 16)
    cands = search.candidates("block", model.spec, settings)
    slots = [Slot(search.candidate_masks(model.spec, c, settings)) for c in cands]
    scorer = _scorer(shape=shape)
    backwards = list(reversed(range(len(slots))))
    tied = step.score_step(scorer, model, slots, order=backwards, bound=True)
    assert len(set(tied.ppl)) == 1  # every removal is a no-op: all scores are exactly equal
    assert tied.winner() == 0 and tied.skipped == 0.0
    assert tied.ppl[0] == scorer.perplexity(model)


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 1, 1)])
def test_a_later_copy_of_the_best_scored_first_does_not_steal_the_win(shape):
    model = tiny_models.model(FAMILY)
    head = model.lm_head.kernel
    head[...] = 10.0 * head[...]  # confident predictions: the candidates' scores spread widely
    scorer = _scorer(rows=24, shape=shape)
    ones = masks_lib.ones(model.spec)
    masks = [masks_lib.with_block_off(ones, kind, i) for kind in ("attn", "mlp") for i in range(4)]
    masks += [masks_lib.with_width(ones, "channels", i, w) for i in (1, 3) for w in (8, 64)]
    exhaustive = step.score_step(scorer, model, [Slot(m) for m in masks], bound=False)
    best = exhaustive.winner()
    assert exhaustive.ppl[best] == min(exhaustive.ppl) < max(exhaustive.ppl) / 2
    # The best again at the end, scored first; the original must still win.
    slots = [Slot(m) for m in masks] + [Slot(masks[best])]
    order = [len(masks), *range(len(masks))]
    bounded = step.score_step(scorer, model, slots, order=order, bound=True)
    assert bounded.winner() == best
    assert bounded.ppl[best] == bounded.ppl[-1] == exhaustive.ppl[best]
    assert bounded.skipped > 0.0  # some stopped before their last rows
    for k, ppl in enumerate(bounded.ppl[:-1]):
        assert ppl is None or ppl == exhaustive.ppl[k]


def _nan_mlp(layer: int):
    """A model whose MLP of ``layer`` outputs NaN: only removing that block gives a finite score."""
    model = tiny_models.model(FAMILY)
    down = model.model.layers[layer].mlp.down_proj.kernel
    down[...] = down[...].at[0, 0].set(jnp.nan)
    return model


@pytest.mark.parametrize("bound", [False, True])
def test_nan_candidates_lose_and_a_removed_block_is_not_computed(bound):
    model = _nan_mlp(2)
    settings = search.Settings(1.0, (1.0, 0.0, 0.0), 32, 16, bound=bound)
    scorers = {"block": _scorer(rows=4), "width": _scorer(rows=2, seed=2)}
    _, state = search.search(model, model.spec, scorers, settings)
    first = state.steps[0]
    assert (first.stage, first.kind, first.layer) == ("block", "mlp", 2)
    removed = surgery.shrink(model, search.remove(model.spec, first.candidate, settings))
    assert math.isfinite(first.ppl)
    assert first.ppl == pytest.approx(scorers["block"].perplexity(removed), rel=1e-6)
    # every other candidate is NaN: the bound drops each after its first row
    assert first.rows_skipped == (pytest.approx((7 * 3) / (8 * 4)) if bound else 0.0)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_bounded_and_exhaustive_searches_agree_bit_for_bit(family):
    model = tiny_models.model(family)
    surgery.reorder(model)
    outcomes = []
    for bound in (False, True):
        scorers = {
            "block": Scorer(tiny_models.tokens(6, 16, seed=1), ignore_id=3, batch_size=1),
            "width": Scorer(tiny_models.tokens(3, 16, seed=2), ignore_id=3, batch_size=1),
        }
        settings = search.Settings(25.0, (0.44, 0.52, 0.04), 32, 64 if family == "qwen3" else 32)
        settings = dataclasses.replace(settings, bound=bound)
        _, state = search.search(model, model.spec, scorers, settings)
        outcomes.append([(s.stage, s.kind, s.layer, s.ppl) for s in state.steps])
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) >= 3


def test_skipped_blocks_match_the_physically_removed_model():
    model = tiny_models.model("qwen2")
    spec = model.spec
    ones = masks_lib.ones(spec)
    masks = masks_lib.with_block_off(masks_lib.with_block_off(ones, "attn", 1), "mlp", 3)
    layers = list(spec.layers)
    layers[1] = dataclasses.replace(layers[1], has_attn=False)
    layers[3] = dataclasses.replace(layers[3], has_mlp=False)
    smaller = surgery.shrink(model, spec.replace_layers(layers))
    tokens = jnp.asarray(tiny_models.tokens(2, 16))
    np.testing.assert_allclose(
        np.asarray(model(tokens, masks)), np.asarray(smaller(tokens)), rtol=1e-5, atol=1e-5
    )
