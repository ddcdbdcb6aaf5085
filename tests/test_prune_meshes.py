"""``scripts/prune.py`` end to end on every mesh form, each in its own process with its own
number of fake CPU devices: every run finishes and takes the same decisions.

A "model" axis puts collectives in the layer programs; with dozens of programs queued they used
to deadlock XLA:CPU (see ``multipruner_jax/inflight.py``), so the block stage here scores 25
batches of rows (9 batches did not deadlock the old code, 25 did).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import tiny_models

from multipruner_jax import assets, data

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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    corpus = data.load_records(str(assets.sotu_dir()))[:400]
    tiny_models.tiny_tokenizer(path, corpus)
    tiny_models.save_hf_model(path, "llama_gqa", vocab_size=300)
    return path


def _prune(model_dir: str, out: str, mesh: str, devices: int) -> subprocess.CompletedProcess:
    flags = [
        f"--model_path={model_dir}",
        f"--output_path={out}",
        "--weight_reorder",
        "--target_ratio=12",
        "--pruning_distribution=20:80:0",
        "--mlp_channel_group_size=32",
        "--attn_channel_group_size=32",
        f"--calibration_dataset={assets.sotu_dir()}",
        "--num_calibration_samples_block=6",
        "--num_calibration_samples_width=1",
        "--seqlen=32",
        "--batch_size=4",
        f"--mesh_shape={mesh}",
        "--quiet",
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": REPO,
    }
    script = os.path.join(REPO, "scripts", "prune.py")
    return subprocess.run(
        [sys.executable, script, *flags], env=env, capture_output=True, text=True, timeout=600
    )


def test_every_mesh_form_finishes_with_the_same_decisions(model_dir, tmp_path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {
            mesh: pool.submit(_prune, model_dir, str(tmp_path / mesh), mesh, devices)
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
