"""Candidates scored side by side on the mesh's "candidate" axis: the same numbers as one at a
time, the same decisions on every mesh, compiles bounded by layer shapes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny_models

from models import masks as masks_lib
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.prune import search, surgery
from multipruner_jax.runtime.scoring import Scorer, Slot

FAMILY = "llama_gqa"  # 2 KV groups, so a model axis of 2 splits heads and MLP channels


def _setup(shape: tuple[int, int, int]):
    mesh = mesh_lib.make_mesh(shape)

    def sharding_for(path, s):
        return mesh_lib.param_sharding(mesh, path, s)

    model = tiny_models.model(FAMILY)
    surgery.reorder(model)
    model = surgery.shrink(model, model.spec, sharding_for)
    batch = 2 * shape[1]
    scorers = {
        "block": Scorer(
            tiny_models.tokens(8, 16, seed=1), ignore_id=3, batch_size=batch, mesh=mesh
        ),
        "width": Scorer(
            tiny_models.tokens(4, 16, seed=2), ignore_id=3, batch_size=batch, mesh=mesh
        ),
    }
    return model, scorers, sharding_for


@functools.cache
def _search(shape: tuple[int, int, int], bound: bool):
    model, scorers, sharding_for = _setup(shape)
    settings = search.Settings(
        target_ratio=20.0, distribution=(0.3, 0.7, 0.0), mlp_group=32, attn_group=32, bound=bound
    )
    _, state = search.search(model, model.spec, scorers, settings, sharding_for=sharding_for)
    return state, {name: s.compiles.count for name, s in scorers.items()}


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2)])
def test_every_candidate_mesh_takes_the_exhaustive_decisions(shape):
    exhaustive, _ = _search((1, 1, 1), False)
    state, compiles = _search(shape, True)
    assert [(s.stage, s.kind, s.layer) for s in state.steps] == [
        (s.stage, s.kind, s.layer) for s in exhaustive.steps
    ]
    assert {s.stage for s in state.steps} == {"block", "mlp_width"}
    for ours, theirs in zip(state.steps, exhaustive.steps, strict=True):
        assert ours.ppl == pytest.approx(theirs.ppl, rel=1e-5)
    # embed + head + one program per distinct layer shape, per calibration set
    shapes = {layer for s in range(len(state.steps) + 1) for layer in _spec_after(state, s).layers}
    assert compiles["block"] + compiles["width"] <= 2 * (len(shapes) + 2)


def _spec_after(state: search.SearchState, steps: int):
    settings = search.Settings(20.0, (0.3, 0.7, 0.0), 32, 32)
    return search.replay(
        search.SearchState(state.steps[:steps]), tiny_models.spec(FAMILY), settings
    )


@pytest.mark.parametrize("shape", [(4, 2, 1), (2, 1, 1)])
def test_a_wave_gives_each_candidate_its_own_exact_scores(shape):
    """Candidates of different layers in one wave, from the prefix cache, give bit for bit the
    row sums that each gives alone, from layer 0, on the same mesh (with (2, 1, 1) the cache
    pass spreads 4 batches over 2 groups)."""
    model, scorers, _ = _setup(shape)
    scorer = scorers["block"]
    ones = masks_lib.ones(model.spec)
    slots = [
        Slot(masks_lib.with_block_off(ones, "mlp", 3), 3),
        Slot(masks_lib.with_width(ones, "kv", 1, 1), 1),
        Slot(masks_lib.with_block_off(ones, "attn", 0), 0),
        Slot(masks_lib.with_width(ones, "channels", 2, 32), 2),
    ][: shape[0]]
    cache = scorer.prefix_cache(model)
    for batch in range(len(scorer.rows)):
        together = scorer.wave(model, slots, batch, cache)
        for k, slot in enumerate(slots):
            alone = scorer.wave(model, [Slot(slot.masks, 0)], batch)[0]
            np.testing.assert_array_equal(together[k], alone)
    sums, _ = scorer.row_nll(model, slots[1].masks)
    assert len(set(np.round(sums, 3))) > 1  # the rows really differ


def test_waves_refuse_what_they_cannot_score():
    model, scorers, _ = _setup((2, 1, 1))
    scorer = scorers["width"]
    ones = masks_lib.ones(model.spec)
    with pytest.raises(ValueError, match="3 slots for a candidate axis of 2"):
        scorer.wave(model, [Slot(ones)] * 3, 0)
    with pytest.raises(ValueError, match="needs the prefix cache"):
        scorer.wave(model, [Slot(ones, 2)], 0)
