"""The prune job end to end on a tiny HF model: outputs, config round trip, resume, bad flags."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_models
from flax import nnx

from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.evals import evaluation
from multipruner_jax.exporting import export
from multipruner_jax.prune import pipeline, search
from multipruner_jax.storage import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_opts = tiny_models.prune_options


def _params(path):
    return nnx.to_pure_dict(nnx.state(checkpoint.restore(path)))


@pytest.fixture(scope="module")
def searched(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("searched")
    summary = pipeline.run(_opts(tiny_model_dir, out))
    return out, summary


def test_search_writes_every_output(searched):
    out, summary = searched
    assert summary["ratio"] >= 30.0
    config = json.loads((out / "pruning_config.json").read_text())
    assert set(config) == {
        "pruned_attn_idx",
        "pruned_mlp_idx",
        "pruned_attn_width",
        "pruned_mlp_width",
        "weight_reorder",
    }
    log = json.loads((out / "log.json").read_text())["steps"]
    assert len(log) == summary["steps"] >= 3
    step_files = os.listdir(out / "pruned_model_configs")
    assert len(step_files) == len(log)
    last_name = f"config.{log[-1]['stage']}.{log[-1]['step']}.json"
    assert json.loads((out / "pruned_model_configs" / last_name).read_text()) == config
    for record in log:
        assert {"step", "pruning_target", "importance", "ratio", "seconds", "compiles"} <= set(
            record
        )
    restored = checkpoint.restore(str(out / "checkpoint"))
    assert restored.spec.num_layers == 4
    assert not [name for name in os.listdir(out) if name.startswith(".checkpoint")]


def test_applying_our_config_reproduces_the_searched_model(searched, tiny_model_dir, tmp_path):
    out, summary = searched
    applied = pipeline.run(
        _opts(tiny_model_dir, tmp_path, pruned_model_config_file=str(out / "pruning_config.json"))
    )
    assert applied["pruned_params"] == summary["pruned_params"]
    a, b = _params(str(out / "checkpoint")), _params(str(tmp_path / "checkpoint"))
    flat_a = dict(nnx.traversals.flatten_mapping(a))
    flat_b = dict(nnx.traversals.flatten_mapping(b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])


def test_config_with_other_reorder_flag_is_refused(searched, tiny_model_dir, tmp_path):
    out, _ = searched
    opts = _opts(
        tiny_model_dir,
        tmp_path,
        weight_reorder=False,
        pruned_model_config_file=str(out / "pruning_config.json"),
    )
    with pytest.raises(ValueError, match="weight_reorder"):
        pipeline.run(opts)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_reaches_the_same_config(
    searched, tiny_model_dir, tmp_path, monkeypatch
):
    out, _ = searched
    original = pipeline._Outputs.on_step

    def dying(self, state, model):
        original(self, state, model)
        if len(state.steps) == 3:
            raise _Killed

    monkeypatch.setattr(pipeline._Outputs, "on_step", dying)
    with pytest.raises(_Killed):
        pipeline.run(_opts(tiny_model_dir, tmp_path))
    saved = json.loads((tmp_path / "search_state.json").read_text())
    assert len(saved["steps"]) == 3
    assert not (tmp_path / "pruning_config.json").exists()
    monkeypatch.setattr(pipeline._Outputs, "on_step", original)
    with pytest.raises(ValueError, match="--resume"):
        pipeline.run(_opts(tiny_model_dir, tmp_path))
    pipeline.run(_opts(tiny_model_dir, tmp_path, resume=True))
    resumed = json.loads((tmp_path / "search_state.json").read_text())
    assert resumed["steps"][:3] == saved["steps"]  # replayed, not re-scored (same timings)
    full = json.loads((out / "search_state.json").read_text())

    def decisions(steps):
        return [(s["stage"], s["kind"], s["layer"], s["ppl"]) for s in steps]

    assert decisions(resumed["steps"]) == decisions(full["steps"])
    assert (tmp_path / "pruning_config.json").read_text() == (
        out / "pruning_config.json"
    ).read_text()


def test_resume_with_other_options_is_refused(searched, tiny_model_dir):
    out, _ = searched
    with pytest.raises(ValueError, match="other options"):
        pipeline.run(_opts(tiny_model_dir, out, resume=True, target_ratio=40.0))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(target_ratio=0.0), "target_ratio"),
        (dict(target_ratio=100.0), "target_ratio"),
        (dict(pruning_distribution="1:2"), "pruning distribution"),
        (dict(mlp_channel_group_size=40), "mlp_channel_group_size"),
        (dict(attn_channel_group_size=8), "whole KV groups"),
        (dict(model_path="/nonexistent/model"), "model_path"),
        (dict(pruned_model_config_file="/nonexistent.json"), "no such pruning config"),
        (dict(resume=True), "nothing to resume"),
        (dict(num_calibration_samples_block=0), "num_calibration_samples_block"),
        (dict(dtype="float16"), "dtype"),
        (dict(mesh_shape="2"), "mesh_shape"),
        (dict(mesh_shape="4,2"), "batch_size=2: expected 0 .* multiple of the mesh.s data axis .4"),
    ],
)
def test_bad_options_fail_before_loading(tiny_model_dir, tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipeline.check_options(_opts(tiny_model_dir, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_script_writes_reusable_flags_and_reports_errors(tiny_model_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flagfile = tmp_path / "run.flags"
    opts = _opts(tiny_model_dir, tmp_path / "out", target_ratio=8.0)
    lines = [
        f"--{f.name}={getattr(opts, f.name)}"
        for f in dataclasses.fields(opts)
        if getattr(opts, f.name) is not None and not isinstance(getattr(opts, f.name), bool)
    ]
    # --scoring_mode=layer: as in every flags.txt written before the flag was retired
    old_flag = "--scoring_mode=layer\n"
    flagfile.write_text(
        "# tiny run\n" + "\n".join(lines) + "\n--weight_reorder\n--quiet\n" + old_flag
    )
    script = os.path.join(REPO, "scripts", "prune.py")
    done = subprocess.run(
        [sys.executable, script, f"--flagfile={flagfile}"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = (tmp_path / "out" / "flags.txt").read_text()
    assert "--target_ratio=8.0" in written and "--weight_reorder" in written
    assert "scoring_mode" not in written
    bad = subprocess.run(
        [
            sys.executable,
            script,
            f"--flagfile={flagfile}",
            "--output_path",
            str(tmp_path / "x"),
            "--pruning_distribution=1:1",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "error: pruning distribution '1:1'" in bad.stderr
    assert not (tmp_path / "x").exists()
    retired = subprocess.run(
        [
            sys.executable,
            script,
            f"--flagfile={flagfile}",
            "--output_path",
            str(tmp_path / "y"),
            "--scoring_mode=model",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert retired.returncode == 1
    assert retired.stderr.strip() == (
        "error: --scoring_mode=model: this flag was removed (scoring always runs per-layer "
        "programs now); delete it from the command line or flagfile"
    )
    assert not (tmp_path / "y").exists()
    state = search.SearchState.from_dict(
        json.loads((tmp_path / "out" / "search_state.json").read_text())
    )
    assert state.steps


def _eval_opts(path: str) -> evaluation.EvalOptions:
    """Perplexity only, on the first 3 rows of 32 tokens, one device."""
    return evaluation.EvalOptions(path, seqlen=32, windows=3, mesh_shape="1,1", tasks="")


def test_evaluate_reads_checkpoints_and_exports_alike(searched, tmp_path):
    out, summary = searched
    ckpt = evaluation.evaluate(_eval_opts(str(out / "checkpoint")))
    assert ckpt["params"] == summary["pruned_params"] and ckpt["rows"] == 3
    assert 1.0 < ckpt["perplexity"] < float("inf")
    for fmt in ("padded", "compact"):  # the formats our loader reads
        export.export_checkpoint(str(out / "checkpoint"), str(tmp_path / fmt), fmt=fmt)
        exported = evaluation.evaluate(_eval_opts(str(tmp_path / fmt)))
        assert exported["perplexity"] == pytest.approx(ckpt["perplexity"], rel=1e-5)
    with pytest.raises(ValueError, match="windows"):
        evaluation.evaluate(evaluation.EvalOptions(str(out / "checkpoint"), windows=-1, tasks=""))


def test_prefix_cache_only_when_it_fits(tiny_model_dir, tmp_path, monkeypatch):
    dense = pipeline.check_options(_opts(tiny_model_dir, tmp_path)).dense
    rows = np.zeros((4, 32), np.int32)
    mesh = mesh_lib.make_mesh((2, 1))
    need = 4 * 32 * dense.hidden_size * dense.num_layers * 4 // 2  # per data device, fp32
    monkeypatch.setattr(pipeline, "_free_device_bytes", lambda: 2 * need)
    assert pipeline._use_prefix_cache(_opts(tiny_model_dir, tmp_path), dense, rows, mesh)
    monkeypatch.setattr(pipeline, "_free_device_bytes", lambda: 2 * need - 2)
    assert not pipeline._use_prefix_cache(_opts(tiny_model_dir, tmp_path), dense, rows, mesh)
    monkeypatch.setattr(pipeline, "_free_device_bytes", lambda: 10**12)
    assert not pipeline._use_prefix_cache(
        _opts(tiny_model_dir, tmp_path, prefix_cache=False), dense, rows, mesh
    )
