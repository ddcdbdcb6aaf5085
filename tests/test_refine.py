"""Refinement after the greedy search (``--refine``) and near ties (``--near_tie_margin``): the
best swap against exhaustive enumeration, the bound changes nothing, the ratio never falls, and a
resumed refinement ends where an uninterrupted one does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from models.spec import count_params, pruned_ratio
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.prune import near_ties, pipeline, refine, search, surgery
from multipruner_jax.runtime.scoring import Scorer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = "llama_mha"
SETTINGS = search.Settings(
    target_ratio=30.0, distribution=(0.44, 0.52, 0.04), mlp_group=32, attn_group=16
)


def _scorer() -> Scorer:
    return Scorer(tiny_models.tokens(6, 16, seed=3), ignore_id=3, batch_size=2)


def _greedy(settings=SETTINGS):
    model = tiny_models.model(FAMILY)
    surgery.reorder(model)
    dense_model, dense = model, model.spec
    block, width = tiny_models.tokens(4, 16, seed=1), tiny_models.tokens(2, 16, seed=2)
    scorers = {
        "block": Scorer(block, ignore_id=3, batch_size=2),
        "width": Scorer(width, ignore_id=3, batch_size=2),
        "all": Scorer(np.concatenate([block, width]), ignore_id=3, batch_size=2),
    }
    pruned, state = search.search(model, dense, scorers, settings)
    return dense_model, dense, pruned.spec, state


@pytest.fixture(scope="module")
def greedy():
    return _greedy()


def _run(greedy, **kw):
    dense_model, dense, spec, _ = greedy
    kw = {"settings": SETTINGS, **kw}
    return refine.refine(dense_model, spec, dense, _scorer(), **kw)


def test_units_moves_and_budgets(greedy):
    _, dense, spec, _ = greedy
    todo = refine.moves(spec, dense, SETTINGS)
    assert todo
    for r, k in todo:
        assert (r.stage, r.kind) == (k.stage, k.kind)
        assert count_params(refine.apply(spec, (r, k), SETTINGS)) <= count_params(spec)
    assert len(refine.moves(spec, dense, SETTINGS, cross_kind=True)) >= len(todo)
    no_heads = dataclasses.replace(SETTINGS, distribution=(0.5, 0.5, 0.0))
    assert all(r.stage != "attn_head" for r, _ in refine.moves(spec, dense, no_heads, True))
    assert refine.parse_budget("") == refine.Budget()
    assert refine.parse_budget("500,30m") == refine.Budget(500, 1800.0)
    assert refine.parse_budget("90s") == refine.Budget(0, 90.0)
    for bad in ("x", "-3", "1.5", "0", "10d"):
        with pytest.raises(ValueError, match="--refine_budget"):
            refine.parse_budget(bad)


def test_a_refine_step_takes_the_best_swap_of_exhaustive_enumeration(greedy):
    dense_model, dense, spec, _ = greedy
    scorer = _scorer()
    current = scorer.perplexity(surgery.shrink(dense_model, spec))
    scores = [
        scorer.perplexity(surgery.shrink(dense_model, refine.apply(spec, move, SETTINGS)))
        for move in refine.moves(spec, dense, SETTINGS)
    ]
    _, state = _run(greedy, budget=refine.Budget(evaluations=len(scores)))
    best = int(np.argmin(scores))
    if scores[best] < current:
        first = state.moves[0]
        assert (first.restored, first.removed) == refine.moves(spec, dense, SETTINGS)[best]
        np.testing.assert_allclose(first.ppl, scores[best], rtol=1e-5)
        np.testing.assert_allclose(first.before, current, rtol=1e-5)
    else:
        assert not state.moves and state.stopped == "no improving move"


def test_refinement_improves_keeps_the_ratio_and_ignores_the_bound(greedy):
    _, dense, spec, _ = greedy
    bounded_model, bounded = _run(greedy)
    _, exhaustive = _run(greedy, settings=dataclasses.replace(SETTINGS, bound=False))
    _, uncached = _run(greedy, settings=dataclasses.replace(SETTINGS, prefix_cache=False))
    assert bounded.moves, "the tiny greedy result should be improvable"
    assert bounded.stopped == "no improving move"
    for other in (exhaustive, uncached):
        assert [m.describe() for m in other.moves] == [m.describe() for m in bounded.moves]
        assert [m.ppl for m in other.moves] == [m.ppl for m in bounded.moves]
    for m in bounded.moves:
        assert m.ppl < m.before
        assert m.ratio >= pruned_ratio(spec, dense) >= SETTINGS.target_ratio
    assert pruned_ratio(bounded_model.spec, dense) >= SETTINGS.target_ratio
    assert bounded.moves[-1].ppl == pytest.approx(_scorer().perplexity(bounded_model), rel=1e-5)


def test_moves_side_by_side_on_the_candidate_axis_take_the_same_decisions(greedy):
    dense_model, dense, spec, _ = greedy
    _, one = _run(greedy)
    mesh = mesh_lib.make_mesh((4, 1, 1))
    wide = Scorer(tiny_models.tokens(6, 16, seed=3), ignore_id=3, batch_size=2, mesh=mesh)
    _, four = refine.refine(dense_model, spec, dense, wide, SETTINGS)
    assert [(m.describe(), m.ppl) for m in four.moves] == [(m.describe(), m.ppl) for m in one.moves]


def test_resume_in_the_middle_of_refinement_ends_the_same(greedy):
    dense_model, dense, spec, _ = greedy
    _, whole = _run(greedy)
    assert len(whole.moves) >= 2
    cut = refine.RefineState.from_dict({"moves": [dataclasses.asdict(m) for m in whole.moves[:1]]})
    model, resumed = _run(greedy, state=cut)
    assert [m.describe() for m in resumed.moves] == [m.describe() for m in whole.moves]
    assert [m.ppl for m in resumed.moves] == [m.ppl for m in whole.moves]
    assert model.spec == refine.replay(whole, spec, dense, SETTINGS)
    other = refine.RefineState.from_dict({"moves": [dataclasses.asdict(whole.moves[1])]})
    other.moves[0].remove_layer = 99
    with pytest.raises(ValueError, match="was not a move there"):
        refine.replay(other, spec, dense, SETTINGS)


def test_an_evaluation_budget_is_deterministic(greedy):
    _, whole = _run(greedy)
    first = whole.moves[0].candidates
    _, capped = _run(greedy, budget=refine.Budget(evaluations=first))
    assert [m.describe() for m in capped.moves] == [whole.moves[0].describe()]
    assert capped.stopped == "budget" and capped.evaluations == first


def test_screened_refinement_takes_the_best_finalist(greedy):
    dense_model, dense, spec, _ = greedy
    _, exact = _run(greedy)
    # Screening on the very rows of the exact score: the best finalist is the best move.
    _, same_rows = _run(greedy, screen=_scorer(), finalists=1)
    assert [(m.describe(), m.ppl) for m in same_rows.moves] == [
        (m.describe(), m.ppl) for m in exact.moves
    ]
    assert all(m.finalists == 1 for m in same_rows.moves)

    # Screening on other rows: the first move is the best of the two best screened moves.
    screen = Scorer(tiny_models.tokens(2, 16, seed=5), ignore_id=3, batch_size=2)
    todo = refine.moves(spec, dense, SETTINGS)
    models = [surgery.shrink(dense_model, refine.apply(spec, move, SETTINGS)) for move in todo]
    screened = [screen.perplexity(m) for m in models]
    finalists = sorted(sorted(range(len(todo)), key=lambda i: (screened[i], i))[:2])
    exact_ppl = {i: _scorer().perplexity(models[i]) for i in finalists}
    best = min(finalists, key=lambda i: (exact_ppl[i], i))
    lines = []
    _, screened_state = _run(greedy, screen=screen, finalists=2, status=lines.append)
    assert f"refine step 0: screened {len(todo)}/{len(todo)} moves, 0:00:00 left" in lines
    assert "refine step 0: scored 2/2 moves, 0:00:00 left" in lines
    current = _scorer().perplexity(surgery.shrink(dense_model, spec))
    assert exact_ppl[best] < current, "the tiny greedy result should be improvable"
    first = screened_state.moves[0]
    assert (first.restored, first.removed) == todo[best]
    np.testing.assert_allclose(first.ppl, exact_ppl[best], rtol=1e-5)
    assert first.finalists == 2 and first.candidates == len(todo)
    for m in screened_state.moves:
        assert m.ppl < m.before and m.ratio >= pruned_ratio(spec, dense)


def test_near_ties_are_rescored_on_every_row():
    assert near_ties.within([2.0, 2.01, None, float("nan"), 2.03, 1.99], 5, 0.011) == [0, 1, 5]
    base = _greedy()[3]
    tied = _greedy(dataclasses.replace(SETTINGS, near_tie=0.05))
    assert all(s.near_ties == 0 for s in base.steps)
    assert any(s.near_ties > 1 for s in tied[3].steps)


class _Killed(Exception):
    pass


def _opts(model_dir, out, **kw):
    return tiny_models.prune_options(
        model_dir, out, **{"refine": True, "refine_cross_kind": True, "report": True, **kw}
    )


@pytest.fixture(scope="module")
def refined_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("refined")
    return out, pipeline.run(_opts(tiny_model_dir, out))


def test_the_job_writes_refined_and_greedy_configs_logs_and_the_picture(refined_run):
    out, summary = refined_run
    assert summary["refine"]["moves"] >= 1 and summary["ratio"] >= 30.0
    log = json.loads((out / "log.json").read_text())["steps"]
    moves = [s for s in log if s["pruning_target"] == "refine"]
    assert len(moves) == summary["refine"]["moves"]
    assert [s["step"] for s in log] == list(range(len(log)))
    greedy = json.loads((out / "pruning_config.greedy.json").read_text())
    final = json.loads((out / "pruning_config.json").read_text())
    assert greedy != final
    assert json.loads(Path(moves[-1]["config_save_to"]).read_text()) == final
    assert (out / "report.svg").stat().st_size > 0 and (out / "report.png").stat().st_size > 0


def test_resume_in_the_middle_of_the_refining_job(
    refined_run, tiny_model_dir, tmp_path, monkeypatch
):
    out, summary = refined_run
    original = pipeline._Outputs.on_move

    def dying(self, refined, model):
        original(self, refined, model)
        raise _Killed

    monkeypatch.setattr(pipeline._Outputs, "on_move", dying)
    with pytest.raises(_Killed):
        pipeline.run(_opts(tiny_model_dir, tmp_path, report=False))
    saved = json.loads((tmp_path / "search_state.json").read_text())
    assert len(saved["refine"]["moves"]) == 1
    monkeypatch.setattr(pipeline._Outputs, "on_move", original)
    with pytest.raises(ValueError, match="pass --refine"):
        pipeline.check_options(tiny_models.prune_options(tiny_model_dir, tmp_path, resume=True))
    pipeline.run(_opts(tiny_model_dir, tmp_path, resume=True, report=False))
    for name in ("pruning_config.json", "pruning_config.greedy.json"):
        assert (tmp_path / name).read_text() == (out / name).read_text()

    def decisions(path):
        moves = json.loads((path / "search_state.json").read_text())["refine"]["moves"]
        return [(m["restore_layer"], m["remove_layer"], m["remove_stage"], m["ppl"]) for m in moves]

    assert decisions(tmp_path) == decisions(out)


def test_refine_flags_are_checked_before_loading(tiny_model_dir, tmp_path):
    for change, message in (
        (dict(refine=False, refine_cross_kind=False, refine_budget="50"), "need --refine"),
        (dict(refine_budget="ten"), "--refine_budget='ten'"),
        (dict(refine=False, refine_budget="", refine_finalists=4), "need --refine"),
        (dict(refine_finalists=-1), "--refine_finalists must be 0 or more, got -1"),
        (dict(near_tie_margin=-0.1), "--near_tie_margin=-0.1"),
    ):
        with pytest.raises(ValueError, match=message):
            pipeline.check_options(_opts(tiny_model_dir, tmp_path / "x", **change))


def test_report_script_draws_runs_and_refuses_other_folders(refined_run, tmp_path):
    out, _ = refined_run
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    script = os.path.join(REPO, "scripts", "report.py")
    pic = tmp_path / "cmp"
    done = subprocess.run(
        [sys.executable, script, f"--run={out}", f"--run={out}", f"--out={pic}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "cmp.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(
        [sys.executable, script, f"--run={tmp_path}"], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"error: --run={tmp_path} is not a prune run folder (it has no pruning_config.json); "
        "pass the --output_path of a prune.py run"
    ]
