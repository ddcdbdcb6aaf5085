"""On the real SmolLM2-135M, the first step of each stage equals an independent torch search.

The independent implementation uses transformers' own model: a block is removed by zeroing its
output projection (``o_proj`` / ``down_proj``), a width group by zeroing the ``o_proj`` columns of
the dropped KV group's query heads or the ``down_proj`` columns of the dropped channels, chosen by
its own magnitude ranking. Perplexity follows the reference's evaluate_ppl in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from multipruner_jax.prune import search, surgery
from multipruner_jax.runtime.scoring import Scorer
from multipruner_jax.storage import assets, data, hf_io

SEQLEN = 128


@pytest.fixture(scope="module")
def setup():
    path = str(assets.smollm2_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    width, block = data.calibration_windows(
        str(assets.sotu_dir()), tokenizer, seqlen=SEQLEN, num_width=1, num_block=2
    )
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, tokenizer.eos_token_id, width, block, torch_model.eval()


def _torch_ppl(model, rows: np.ndarray, ignore_id: int) -> float:
    with torch.inference_mode():
        ids = torch.from_numpy(rows).long()
        logits = model(ids).logits[:, :-1].double()
        targets = ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.permute(0, 2, 1), targets, reduction="none", ignore_index=ignore_id
        )
        counted = targets != ignore_id
        return float(torch.exp(((nll * counted).sum(1) / counted.sum(1)).mean()))


def _zero(param: torch.Tensor, columns=None):
    """Zero ``param`` (or some of its columns) in place; returns a function that restores it."""
    saved = param.detach().clone()
    with torch.no_grad():
        if columns is None:
            param.zero_()
        else:
            param[:, columns] = 0.0
    return lambda: param.data.copy_(saved)


def _mlp_ranking(mlp) -> torch.Tensor:
    score = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
    return torch.sort(score, descending=True, stable=True).indices


def _kv_ranking(attn, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    group = heads // kv_heads
    q = attn.q_proj.weight.abs().sum(1)
    k = attn.k_proj.weight.abs().sum(1).view(kv_heads, 1, head_dim).expand(-1, group, -1)
    v = attn.v_proj.weight.abs().sum(1).view(kv_heads, 1, head_dim).expand(-1, group, -1)
    score = (q.view(kv_heads, group, head_dim) + k + v).reshape(kv_heads, -1).mean(1)
    return torch.sort(score, descending=True, stable=True).indices


def _torch_scores(model, stage: str, rows, ignore_id: int) -> dict[tuple[str, int], float]:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    scores = {}
    for i, layer in enumerate(model.model.layers):
        cands = []
        if stage == "block":
            cands = [("attn", layer.self_attn.o_proj.weight, None)]
            cands.append(("mlp", layer.mlp.down_proj.weight, None))
        elif stage == "mlp_width":
            dropped = _mlp_ranking(layer.mlp)[-256:]
            cands = [("mlp", layer.mlp.down_proj.weight, dropped)]
        else:
            kv = int(
                _kv_ranking(
                    layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
                )[-1]
            )
            cols = torch.arange(kv * group * head_dim, (kv + 1) * group * head_dim)
            cands = [("attn", layer.self_attn.o_proj.weight, cols)]
        for kind, param, columns in cands:
            restore = _zero(param, columns)
            scores[(kind, i)] = _torch_ppl(model, rows, ignore_id)
            restore()
    return scores


@pytest.mark.parametrize(
    "stage, distribution",
    [("block", (1, 0, 0)), ("mlp_width", (0, 1, 0)), ("attn_head", (0, 0, 1))],
)
def test_first_step_of_each_stage_matches_an_independent_torch_search(setup, stage, distribution):
    path, ignore_id, width, block, torch_model = setup
    rows = block if stage == "block" else width
    model = hf_io.load_model(path)
    surgery.reorder(model)
    settings = search.Settings(
        target_ratio=0.01, distribution=distribution, mlp_group=256, attn_group=192
    )
    scorer = Scorer(rows, ignore_id=ignore_id, batch_size=1)
    _, state = search.search(model, model.spec, {"block": scorer, "width": scorer}, settings)
    assert len(state.steps) == 1 and state.steps[0].stage == stage
    ours = state.steps[0]
    torch_scores = _torch_scores(torch_model, stage, rows, ignore_id)
    best = min(torch_scores.values())
    winner = min(torch_scores, key=torch_scores.get)
    # The same winner, unless torch itself sees a tie within float32 noise.
    assert (ours.kind, ours.layer) == winner or torch_scores[(ours.kind, ours.layer)] <= best * (
        1 + 1e-5
    )
    assert ours.ppl == pytest.approx(torch_scores[(ours.kind, ours.layer)], rel=1e-4)
    # Removing a block really changes the score, so the comparison is not vacuous.
    assert max(torch_scores.values()) > best * 1.001
