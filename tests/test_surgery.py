"""Reordering, shrinking to a smaller spec, parameter counting and pruning-config round trips."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from llama2_7b import LLAMA2_7B_CONFIG

from models import masks as masks_lib
from models.spec import (
    LayerSpec,
    ModelSpec,
    count_params,
    pruned_ratio,
    spec_from_hf_config,
)
from multipruner_jax.prune import surgery
from multipruner_jax.storage import pruning_config


def _logits(model, tokens, masks=None):
    return np.asarray(model(jnp.asarray(tokens), masks))


@pytest.mark.parametrize(
    "config, expected",
    [
        (LLAMA2_7B_CONFIG, 6_738_415_616),
        (
            dict(
                LLAMA2_7B_CONFIG, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8
            ),
            8_030_261_248,
        ),
        (
            dict(
                model_type="qwen2",
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
            ),
            7_615_616_512,
        ),
        (
            dict(
                LLAMA2_7B_CONFIG,
                vocab_size=128256,
                hidden_size=3072,
                intermediate_size=8192,
                num_hidden_layers=28,
                num_attention_heads=24,
                num_key_value_heads=8,
                head_dim=128,
                tie_word_embeddings=True,
            ),
            3_212_749_824,
        ),
    ],
    ids=["llama2-7b", "llama3-8b", "qwen2.5-7b", "llama3.2-3b"],
)
def test_dense_parameter_counts_match_the_papers(config, expected):
    assert count_params(spec_from_hf_config(config)) == expected


def test_llama2_7b_ratio_22_count_from_config_alone():
    dense = spec_from_hf_config(LLAMA2_7B_CONFIG)
    layers = [dataclasses.asdict(layer) for layer in dense.layers]
    for i in range(9):
        layers[i]["has_attn"] = False
    layers[9]["has_mlp"] = False
    mlp_layers = [i for i in range(32) if i != 9]
    for n in range(55):  # 55 groups of 1024 spread over surviving MLPs
        layers[mlp_layers[n % len(mlp_layers)]]["mlp_width"] -= 1024
    for n in range(23):  # 23 heads of 128 from surviving attention blocks
        layers[9 + n]["kv_groups"] -= 1
    pruned = dense.replace_layers([LayerSpec(**layer) for layer in layers])
    assert count_params(pruned) == 5_258_874_880
    assert round(pruned_ratio(pruned, dense), 2) == 21.96


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_reorder_keeps_the_function_and_sorts_units(family):
    model = tiny_models.model(family)
    tokens = tiny_models.tokens(2, 12)
    before = _logits(model, tokens)
    surgery.reorder(model)
    np.testing.assert_allclose(_logits(model, tokens), before, atol=2e-5)
    for layer in model.model.layers:
        mlp = layer.mlp
        score = np.abs(np.asarray(mlp.gate_proj.kernel[...])).sum(0) + np.abs(
            np.asarray(mlp.up_proj.kernel[...])
        ).sum(0)
        assert np.all(np.diff(score) <= 1e-6), "MLP channels are not in descending importance"


def test_reorder_breaks_ties_by_lower_index():
    model = tiny_models.model("llama_mha")
    mlp = model.model.layers[0].mlp
    gate = np.asarray(mlp.gate_proj.kernel[...]).copy()
    up = np.asarray(mlp.up_proj.kernel[...]).copy()
    gate[:, 5], up[:, 5] = gate[:, 2], up[:, 2]  # channels 2 and 5 now tie exactly
    mlp.gate_proj.kernel[...] = jnp.asarray(gate)
    mlp.up_proj.kernel[...] = jnp.asarray(up)
    down_before = np.asarray(mlp.down_proj.kernel[...]).copy()
    surgery.reorder(model)
    down_after = np.asarray(mlp.down_proj.kernel[...])
    row2 = np.flatnonzero((down_after == down_before[2]).all(axis=1))[0]
    row5 = np.flatnonzero((down_after == down_before[5]).all(axis=1))[0]
    assert row2 < row5


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_masked_model_equals_shrunk_model(family):
    model = tiny_models.model(family)
    spec = model.spec
    tokens = tiny_models.tokens(2, 12)
    layers = list(spec.layers)
    layers[0] = dataclasses.replace(layers[0], kv_groups=1, mlp_width=40)
    layers[1] = dataclasses.replace(layers[1], has_attn=False)
    layers[2] = dataclasses.replace(
        layers[2], has_mlp=False, kv_groups=spec.num_key_value_heads - 1
    )
    layers[3] = dataclasses.replace(layers[3], has_attn=False, has_mlp=False)
    small = spec.replace_layers(layers)
    masks = masks_lib.ones(spec)
    masks = masks_lib.with_width(masks, "kv", 0, 1)
    masks = masks_lib.with_width(masks, "channels", 0, 40)
    masks = masks_lib.with_block_off(masks, "attn", 1)
    masks = masks_lib.with_block_off(masks, "mlp", 2)
    masks = masks_lib.with_width(masks, "kv", 2, spec.num_key_value_heads - 1)
    masks = masks_lib.with_block_off(masks, "attn", 3)
    masks = masks_lib.with_block_off(masks, "mlp", 3)
    shrunk = surgery.shrink(model, small)
    assert shrunk.spec == small
    np.testing.assert_allclose(_logits(shrunk, tokens), _logits(model, tokens, masks), atol=1e-5)
    leaves = sum(x.size for x in jax_leaves(shrunk))
    assert leaves == count_params(small) < count_params(spec)


def jax_leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model))


def test_shrink_refuses_to_grow():
    model = tiny_models.model("llama_gqa")
    spec = model.spec
    smaller = spec.replace_layers(
        [dataclasses.replace(spec.layers[0], mlp_width=32), *spec.layers[1:]]
    )
    shrunk = surgery.shrink(model, smaller)
    with pytest.raises(ValueError, match="larger"):
        surgery.shrink(shrunk, spec)


def test_pruning_config_round_trip():
    dense = tiny_models.spec("llama_gqa")
    layers = list(dense.layers)
    layers[1] = dataclasses.replace(layers[1], has_attn=False)
    layers[3] = dataclasses.replace(layers[3], has_mlp=False, kv_groups=1, mlp_width=48)
    pruned = dense.replace_layers(layers)
    config = pruning_config.from_spec(pruned, attn_order=[1], mlp_order=[3], weight_reorder=True)
    assert config["pruned_attn_width"]["3"] == 1 * dense.head_dim * dense.q_per_kv
    assert config["pruned_mlp_width"]["3"] == 48
    assert pruning_config.to_spec(dense, config) == pruned


def _drop_last_layer(config):
    for key in ("pruned_attn_width", "pruned_mlp_width"):
        del config[key]["3"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(pruned_attn_idx=[9]), "layer 9 is outside 0..3"),
        (lambda c: c.update(pruned_attn_idx=[1, 1]), "more than once"),
        (lambda c: c.update(pruned_mlp_idx=1), "must be a list"),
        (lambda c: c["pruned_attn_width"].update({"0": 5}), "multiple of one KV group"),
        (lambda c: c["pruned_mlp_width"].update({"0": 0}), "outside 1..96"),
        (lambda c: c["pruned_mlp_width"].update({"0": 97}), "outside 1..96"),
        (lambda c: c["pruned_mlp_width"].update({"x": 3}), "not an integer"),
        (lambda c: c["pruned_mlp_width"].update({"0": 50.5}), r"\[0\]=50.5 is not an integer"),
        (lambda c: c["pruned_mlp_width"].update({"0": "64"}), r"\[0\]='64' is not an integer"),
        (lambda c: c["pruned_attn_width"].update({"0": True}), "not an integer"),
        (lambda c: c["pruned_mlp_width"].update({"4": 32}), "layer 4 is outside 0..3"),
        (_drop_last_layer, r"pruned_attn_width lacks layers 3 of the 4-layer model"),
        (lambda c: c.pop("pruned_mlp_idx"), "lacks 'pruned_mlp_idx'"),
    ],
)
def test_pruning_config_errors(change, message):
    dense = tiny_models.spec("llama_gqa")
    config = pruning_config.from_spec(dense, attn_order=[], mlp_order=[], weight_reorder=False)
    change(config)
    with pytest.raises(pruning_config.PruningConfigError, match=message):
        pruning_config.to_spec(dense, config)


def test_pruning_config_of_a_shorter_model_names_the_missing_layers():
    dense = spec_from_hf_config(dict(LLAMA2_7B_CONFIG, num_hidden_layers=30))
    shorter = spec_from_hf_config(dict(LLAMA2_7B_CONFIG, num_hidden_layers=24))
    config = pruning_config.from_spec(shorter, attn_order=[], mlp_order=[], weight_reorder=True)
    with pytest.raises(pruning_config.PruningConfigError, match=r"lacks layers 24\.\.29"):
        pruning_config.to_spec(dense, config)


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_spec_json_round_trip(family):
    spec = tiny_models.spec(family)
    layers = list(spec.layers)
    layers[2] = dataclasses.replace(layers[2], has_attn=False, mlp_width=17)
    pruned = spec.replace_layers(layers)
    assert ModelSpec.from_json(pruned.to_json()) == pruned
