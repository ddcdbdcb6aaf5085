"""Perplexity scoring: the reference protocol, chunked cross-entropy, compiles, meshes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

from models import masks as masks_lib
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.prune import surgery
from multipruner_jax.runtime.scoring import Scorer, head_nll

IGNORE = 5


def _reference_ppl(model, tokens, masks=None, ignore=IGNORE):
    """The reference's evaluate_ppl in float64 numpy from full logits."""
    logits = np.asarray(model(jnp.asarray(tokens), masks), np.float64)[:, :-1]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = tokens[:, 1:]
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    counted = targets != ignore
    return float(np.exp(np.mean((nll * counted).sum(1) / counted.sum(1))))


def test_perplexity_follows_the_reference_protocol():
    model = tiny_models.model("qwen2")
    tokens = tiny_models.tokens(5, 20)
    tokens[0, 3:9] = IGNORE
    scorer = Scorer(tokens, ignore_id=IGNORE, batch_size=2, token_chunk=16)
    assert scorer.perplexity(model) == pytest.approx(_reference_ppl(model, tokens), rel=1e-5)
    masks = masks_lib.with_width(masks_lib.ones(model.spec), "channels", 1, 30)
    assert scorer.perplexity(model, masks) == pytest.approx(
        _reference_ppl(model, tokens, masks), rel=1e-5
    )


def test_no_ignore_id_counts_every_target():
    model = tiny_models.model("llama_mha")
    tokens = tiny_models.tokens(2, 12)
    tokens[:, 4] = IGNORE
    scorer = Scorer(tokens, ignore_id=None, batch_size=1)
    expected = _reference_ppl(model, tokens, ignore=-1)
    assert scorer.perplexity(model) == pytest.approx(expected, rel=1e-5)
    sums, counts = scorer.row_nll(model)
    np.testing.assert_array_equal(counts, [11, 11])


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_cross_entropy_matches_full_softmax(tied):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)
    w = rng.standard_normal((6, 37)).astype(np.float32)  # [D, V]
    tokens = jnp.asarray(rng.integers(0, 37, (2, 8)), jnp.int32)
    weight = jnp.asarray(w.T if tied else w)
    # 14 predicted positions in chunks of 4: three full chunks and a padded one
    sums, counts = head_nll(h, weight, tied, tokens, -1, token_chunk=4)
    logits = np.asarray(h, np.float64)[:, :-1] @ w.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(sums), nll.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), [7, 7])


def test_padding_rows_do_not_change_the_result():
    model = tiny_models.model("mistral")
    tokens = tiny_models.tokens(5, 16)
    one = Scorer(tokens, ignore_id=IGNORE, batch_size=1).perplexity(model)
    padded = Scorer(tokens, ignore_id=IGNORE, batch_size=4).perplexity(model)
    assert padded == pytest.approx(one, rel=1e-6)


def test_many_masks_compile_once_per_layer_shape():
    model = tiny_models.model("llama_gqa")
    scorer = Scorer(tiny_models.tokens(4, 16), ignore_id=IGNORE, batch_size=2)
    scorer.perplexity(model)
    first = scorer.compiles.count
    assert first == 3  # embed, one layer shape, head
    ones = masks_lib.ones(model.spec)
    seen = set()
    for layer in range(model.spec.num_layers):
        for masks in (
            masks_lib.with_block_off(ones, "attn", layer),
            masks_lib.with_block_off(ones, "mlp", layer),
            masks_lib.with_width(ones, "kv", layer, 1),
            masks_lib.with_width(ones, "channels", layer, 17),
        ):
            seen.add(round(scorer.perplexity(model, masks), 6))
    assert len(seen) > 10  # the masks really changed the scores
    assert scorer.compiles.count == first
    smaller = surgery.shrink(
        model,
        model.spec.replace_layers(
            [model.spec.layers[0].__class__(True, 1, True, 64), *model.spec.layers[1:]]
        ),
    )
    scorer.perplexity(smaller)
    assert scorer.compiles.count == first + 1  # one new layer shape


def test_prefix_cache_scores_equal_full_scores():
    model = tiny_models.model("qwen3")
    scorer = Scorer(tiny_models.tokens(3, 16), ignore_id=IGNORE, batch_size=1)
    cache = scorer.prefix_cache(model)
    ones = masks_lib.ones(model.spec)
    for layer in range(model.spec.num_layers):
        masks = masks_lib.with_width(ones, "channels", layer, 40)
        cached = scorer.perplexity(model, masks, cache, layer)
        assert cached == scorer.perplexity(model, masks)
    other = tiny_models.model("qwen3")
    with pytest.raises(ValueError, match="another model"):
        scorer.perplexity(other, ones, cache, 1)


@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (4, 2), (2, 4)])
def test_meshes_agree(shape):
    model = tiny_models.model("llama_gqa")
    tokens = tiny_models.tokens(8, 16)
    reference = Scorer(tokens, ignore_id=IGNORE, batch_size=8).perplexity(model)
    mesh = mesh_lib.make_mesh(shape)
    sharded = surgery.shrink(model, model.spec, functools.partial(mesh_lib.param_sharding, mesh))
    kernel = sharded.model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == (
        jax.sharding.PartitionSpec(None, "model") if shape[1] > 1 else jax.sharding.PartitionSpec()
    )
    scorer = Scorer(tokens, ignore_id=IGNORE, batch_size=8, mesh=mesh)
    assert scorer.rows.batches[0].sharding.spec[0] == "data"
    masks = masks_lib.with_width(masks_lib.ones(model.spec), "kv", 2, 1)
    assert scorer.perplexity(sharded) == pytest.approx(reference, rel=1e-6)
    assert scorer.perplexity(sharded, masks) == pytest.approx(
        Scorer(tokens, ignore_id=IGNORE, batch_size=8).perplexity(model, masks), rel=1e-6
    )


def test_bad_inputs():
    with pytest.raises(ValueError, match="tokens must be"):
        Scorer(np.zeros((0, 4), np.int32), ignore_id=None)
    with pytest.raises(ValueError, match="data axis"):
        Scorer(
            np.zeros((1, 4), np.int32),
            ignore_id=None,
            batch_size=3,
            mesh=mesh_lib.make_mesh((2, 1)),
        )
    with pytest.raises(ValueError, match="needs 16 devices"):
        mesh_lib.make_mesh((4, 4))
