"""The greedy three-stage search on tiny models of every family."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest
import tiny_models
from flax import nnx

from models.spec import ModelSpec, pruned_ratio
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.prune import search, surgery
from multipruner_jax.runtime.cross_entropy import output_weight
from multipruner_jax.runtime.engine import CompileCounter
from multipruner_jax.runtime.rows import Rows
from multipruner_jax.runtime.scoring import Scorer, head_nll
from multipruner_jax.storage import assets, hf_io

GROUPS = {  # (mlp group, attention group in query channels = one KV group)
    "llama_mha": (32, 16),
    "llama_gqa": (32, 32),
    "mistral": (32, 32),
    "qwen2": (32, 32),
    "qwen3": (32, 64),
}


def _scorers(scorer=Scorer) -> dict[str, Scorer]:
    return {
        "block": scorer(tiny_models.tokens(4, 16, seed=1), ignore_id=3, batch_size=2),
        "width": scorer(tiny_models.tokens(2, 16, seed=2), ignore_id=3, batch_size=2),
    }


class _WholeModel:
    """Scores a masked model with one jit of the whole ``CausalLM.hidden_states`` (no per-layer
    engine, no waves): an independent check of ``Scorer``, with its interface."""

    candidates = 1

    def __init__(self, tokens: np.ndarray, *, ignore_id: int, batch_size: int):
        mesh = mesh_lib.make_mesh((1, 1))
        self.rows = Rows(tokens, ignore_id=ignore_id, batch_size=batch_size, mesh=mesh)
        self.compiles = CompileCounter()

        def nll(graphdef, state, masks, tokens):
            model = nnx.merge(graphdef, state)
            h = model.hidden_states(tokens, masks)
            return head_nll(h, *output_weight(model), tokens, ignore_id, 512)[0]

        self._nll = self.compiles.jit(nll, static_argnums=0)

    def wave(self, model, slots, batch, cache=None):
        assert cache is None and len(slots) == 1
        graphdef, state = nnx.split(model)
        out = self._nll(graphdef, state, slots[0].masks, self.rows.batches[batch])
        return np.asarray(out, np.float64)[None, : len(self.rows.spans[batch])]


def _settings(family: str, **kw) -> search.Settings:
    mlp, attn = GROUPS[family]
    base = dict(target_ratio=30.0, distribution=(0.44, 0.52, 0.04), mlp_group=mlp, attn_group=attn)
    return search.Settings(**{**base, **kw})


def _run(family: str, settings: search.Settings, scorer=Scorer, on_step=None):
    model = tiny_models.model(family)
    dense = model.spec
    surgery.reorder(model)
    scorers = _scorers(scorer)
    pruned, state = search.search(model, dense, scorers, settings, on_step=on_step)
    return dense, pruned, state, scorers


def _decisions(state: search.SearchState) -> list[tuple[str, str, int]]:
    return [(s.stage, s.kind, s.layer) for s in state.steps]


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_search_reaches_each_stage_target_deterministically(family):
    settings = _settings(family)
    search.check_targets(tiny_models.spec(family), settings)  # reachable, so not refused
    dense, pruned, state, _ = _run(family, settings)
    assert pruned_ratio(pruned.spec, dense) >= settings.target_ratio
    assert pruned.spec == search.replay(state, dense, settings)
    targets = dict(zip(search.STAGES, settings.stage_targets(), strict=True))
    for stage in search.STAGES:
        steps = [s for s in state.steps if s.stage == stage]
        if steps:  # a stage stops at its target (or when out of candidates), one step past it
            before_last = steps[-2].ratio if len(steps) > 1 else -1.0
            assert before_last < targets[stage]
            after = search.replay(
                search.SearchState(state.steps[: steps[-1].step + 1]), dense, settings
            )
            assert targets[stage] <= steps[-1].ratio or not search.candidates(
                stage, after, settings
            )
    assert {s.stage for s in state.steps} >= {"block", "mlp_width"}
    _, _, again, _ = _run(family, settings)
    assert _decisions(again) == _decisions(state)


@pytest.mark.parametrize("family", ["llama_mha", "qwen3"])
def test_winning_masked_score_equals_the_rebuilt_model(family):
    settings = _settings(family)
    rebuilt = []
    scorers = _scorers()

    def check(state, model):
        name = "block" if state.steps[-1].stage == "block" else "width"
        rebuilt.append((state.steps[-1].ppl, scorers[name].perplexity(model)))

    model = tiny_models.model(family)
    search.search(model, model.spec, scorers, settings, on_step=check)
    assert len(rebuilt) >= 3
    for masked, physical in rebuilt:
        assert physical == pytest.approx(masked, rel=1e-5)


def test_compiles_are_bounded_by_layer_shapes_not_candidates():
    settings = _settings("llama_gqa")
    dense, _, state, scorers = _run("llama_gqa", settings)
    seen = set()
    for k, step in enumerate(state.steps):
        before = search.replay(search.SearchState(state.steps[:k]), dense, settings)
        # embed + head + at most one program per layer shape of the scored model
        assert step.compiles <= len(set(before.layers)) + 2, step
        seen |= set(before.layers)
    assert sum(s.candidates for s in state.steps) > sum(s.compiles for s in state.steps)
    assert sum(s.compiles.count for s in scorers.values()) <= 2 * (len(seen) + 2)


def test_prefix_cache_and_a_whole_model_forward_take_the_same_decisions():
    family = "mistral"
    _, _, cached, _ = _run(family, _settings(family, prefix_cache=True))
    _, _, uncached, _ = _run(family, _settings(family, prefix_cache=False))
    _, _, whole, _ = _run(family, _settings(family, prefix_cache=False), _WholeModel)
    assert _decisions(cached) == _decisions(uncached) == _decisions(whole)
    for a, b in zip(cached.steps, whole.steps, strict=True):
        assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def test_candidate_order_and_width_limits():
    spec = tiny_models.spec("llama_gqa")  # 4 layers, 2 KV groups, MLP width 96
    settings = _settings("llama_gqa")
    layers = list(spec.layers)
    layers[1] = dataclasses.replace(layers[1], has_attn=False)
    layers[2] = dataclasses.replace(layers[2], mlp_width=32, kv_groups=1)
    spec = spec.replace_layers(layers)
    blocks = search.candidates("block", spec, settings)
    assert [(c.kind, c.layer) for c in blocks] == [
        ("attn", 0),
        ("attn", 2),
        ("attn", 3),
        ("mlp", 0),
        ("mlp", 1),
        ("mlp", 2),
        ("mlp", 3),
    ]
    assert [c.layer for c in search.candidates("mlp_width", spec, settings)] == [0, 1, 3]
    assert [c.layer for c in search.candidates("attn_head", spec, settings)] == [0, 3]


def test_stage_targets_are_cumulative():
    settings = search.Settings(target_ratio=20.0, distribution=search.parse_distribution("2:7:1"))
    np.testing.assert_allclose(settings.stage_targets(), (4.0, 18.0, 20.0))


@pytest.mark.parametrize("text", ["1:2", "a:b:c", "-1:1:1", "0:0:0", "1:inf:1"])
def test_bad_distributions_are_rejected(text):
    with pytest.raises(ValueError, match="pruning distribution"):
        search.parse_distribution(text)


def test_group_size_rules():
    spec = tiny_models.spec("llama_gqa")  # head_dim 8, 4 query heads per KV head
    search.check_group_sizes(spec, 32, 32)
    with pytest.raises(ValueError, match="divisor of the MLP width 96"):
        search.check_group_sizes(spec, 40, 32)
    with pytest.raises(ValueError, match="whole KV groups"):
        search.check_group_sizes(spec, 32, 8)


def _smollm2() -> ModelSpec:
    """The real SmolLM2-135M's dense spec (30 layers, 9 heads / 3 KV heads, MLP 1536)."""
    return hf_io.read_dense_spec(str(assets.smollm2_dir()))


@pytest.mark.parametrize(
    "distribution, mlp, attn, target, stage",
    [
        ("0:0:1", 512, 576, 5.0, "attention-head"),  # one group is every KV group: no candidates
        ("20:80:0", 1536, 192, 10.0, "MLP-width"),  # one group is the whole MLP
        ("1:0:0", 512, 192, 99.0, "block"),  # more than all blocks together
        ("0:1:0", 512, 192, 60.0, "MLP-width"),  # every MLP down to 512 channels is ~45 %
    ],
)
def test_unreachable_stage_targets_are_refused(distribution, mlp, attn, target, stage):
    dense = _smollm2()
    settings = search.Settings(
        target_ratio=target,
        distribution=search.parse_distribution(distribution),
        mlp_group=mlp,
        attn_group=attn,
    )
    with pytest.raises(ValueError, match=f"asks the {stage} stage to reach"):
        search.check_targets(dense, settings)


@pytest.mark.parametrize("target", [5.0, 10.0, 20.0, 40.0])
def test_the_demo_settings_are_reachable(target):
    dense = _smollm2()
    settings = search.Settings(target, search.parse_distribution("20:80:0"), 512, 192)
    search.check_targets(dense, settings)


def test_a_stage_out_of_candidates_is_recorded():
    settings = _settings("llama_gqa", target_ratio=90.0, distribution=(0.0, 1.0, 0.0))
    dense = tiny_models.spec("llama_gqa")
    with pytest.raises(ValueError, match="MLP-width"):
        search.check_targets(dense, settings)
    _, pruned, state, _ = _run("llama_gqa", settings)
    assert [s.stage for s in state.shortfalls] == ["mlp_width", "attn_head"]
    assert all(layer.mlp_width == 32 and layer.kv_groups == 1 for layer in pruned.spec.layers)
    assert state.shortfalls[0].ratio < 90.0 and "ran out of candidates" in (
        state.shortfalls[0].describe()
    )


def test_remaining_seconds_counts_the_candidates_left():
    dense = tiny_models.spec("llama_gqa")  # 4 layers, MLP width 96 in groups of 32
    settings = _settings("llama_gqa", target_ratio=30.0, distribution=(0.0, 1.0, 0.0))
    cost = {"block": 1.0, "mlp_width": 2.0, "attn_head": 3.0}
    one_group = pruned_ratio(
        search.remove(dense, search.Candidate("mlp_width", "mlp", 0), settings), dense
    )
    steps = -(-30.0 // one_group)
    assert search.remaining_seconds(dense, dense, settings, cost) == steps * 4 * 2.0
    assert search.remaining_seconds(dense, dense, settings, {**cost, "mlp_width": 0.0}) == 0.0


def test_remaining_seconds_counts_later_stages_during_the_block_stage():
    """Midway through stage 1 the estimate still includes stage 2 (it once came out 0 because
    the removal sizes were taken relative to the block target instead of today's ratio)."""
    dense = tiny_models.spec("llama_gqa")
    settings = _settings("llama_gqa", target_ratio=40.0, distribution=(0.5, 0.5, 0.0))
    block_only = {"block": 1.0, "mlp_width": 0.0, "attn_head": 0.0}
    width_only = {"block": 0.0, "mlp_width": 1.0, "attn_head": 0.0}
    spec = search.remove(dense, search.Candidate("block", "attn", 1), settings)
    assert 0 < pruned_ratio(spec, dense) < settings.stage_targets()[0]
    assert search.remaining_seconds(spec, dense, settings, block_only) > 0
    assert search.remaining_seconds(spec, dense, settings, width_only) > 0


def test_the_stage_table_covers_every_stage_in_search_order():
    assert search.STAGES == get_args(search.Stage) == ("block", "mlp_width", "attn_head")
    assert [search.scorer_for(s) for s in search.STAGES] == ["block", "width", "width"]
    assert search.Candidate("mlp_width", "mlp", 2).describe() == "mlp channel group of layer 2"
