"""``scripts/prune.py`` end to end on every mesh form, each in its own process with its own
number of fake CPU devices: every run finishes and takes the same decisions.

A "model" axis puts collectives in the layer programs; with dozens of programs queued they used
to deadlock XLA:CPU (see ``multipruner_jax/runtime/inflight.py``), so the block stage here scores 25
batches of rows (9 batches did not deadlock the old code, 25 did).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --mesh_shape -> fake CPU devices of its process
MESHES = {
    "1,2": 2,
    "2,1": 2,
    "2,4": 8,
    "4,2": 8,
    "8,1,1": 8,
    "4,2,1": 8,
    "2,2,2": 8,
    "1,4,2": 8,
}


def _prune(model_dir: str, out: str, mesh: str, devices: int) -> subprocess.CompletedProcess:
    opts = tiny_models.prune_options(
        model_dir,
        out,
        target_ratio=12.0,
        pruning_distribution="20:80:0",
        num_calibration_samples_block=6,
        num_calibration_samples_width=1,
        batch_size=4,
        mesh_shape=mesh,
    )
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": REPO,
    }
    script = os.path.join(REPO, "scripts", "prune.py")
    return subprocess.run(
        [sys.executable, script, *tiny_models.prune_flags(opts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_mesh_form_finishes_with_the_same_decisions(tiny_model_dir, tmp_path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {
            mesh: pool.submit(_prune, tiny_model_dir, str(tmp_path / mesh), mesh, devices)
            for mesh, devices in MESHES.items()
        }
        done = {mesh: run.result() for mesh, run in runs.items()}
    for mesh, run in done.items():
        assert run.returncode == 0, f"--mesh_shape={mesh}:\n{run.stderr[-3000:]}"
    decisions = {}
    for mesh in MESHES:
        log = json.loads((tmp_path / mesh / "log.json").read_text())["steps"]
        decisions[mesh] = [(s["stage"], s["kind"], s["layer"]) for s in log]
        config = json.loads((tmp_path / mesh / "pruning_config.json").read_text())
        assert config == json.loads((tmp_path / "1,2" / "pruning_config.json").read_text())
    stages = {stage for stage, _, _ in decisions["1,2"]}
    assert stages == {"block", "mlp_width"}
    assert all(d == decisions["1,2"] for d in decisions.values()), decisions


ZERO_SHOT = """
import functools

import numpy as np
import tiny_models
from models import decoder
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.evals.loglik import ContinuationScorer
from multipruner_jax.prune import surgery

mesh = mesh_lib.make_mesh((1, 2))
spec = tiny_models.spec("llama_gqa", num_hidden_layers=40)  # 42 programs per batch
model = surgery.shrink(decoder.build(spec), spec, functools.partial(mesh_lib.param_sharding, mesh))
rng = np.random.default_rng(0)
tokens = [rng.integers(0, 97, 12).tolist() for _ in range(40)]
scorer = ContinuationScorer(model, mesh=mesh, batch_size=2)
logprob, _ = scorer.score(tokens, [t[-3:] for t in tokens])
assert np.all(np.isfinite(logprob)) and np.all(logprob < 0)
print("scored", len(logprob))
"""


def test_zero_shot_scoring_on_a_model_axis_finishes():
    """evaluate.py's zero-shot scorer queues a whole model per batch (deadlocked before)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", ZERO_SHOT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 40" in done.stdout
