"""``prune.py --distributed`` as on a TPU VM slice: 2 local processes x 4 CPU devices (Gloo
collectives through a local coordinator) take the decisions of one process with 8 devices."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest
import tiny_models

from multipruner_jax.base import mesh
from multipruner_jax.prune import pipeline
from multipruner_jax.storage import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "2,2,2"  # a candidate group per process, rows and heads split inside each


def _options(model_dir: str, out: str) -> pipeline.PruneOptions:
    return tiny_models.prune_options(
        model_dir,
        out,
        target_ratio=12.0,
        pruning_distribution="20:80:0",
        num_calibration_samples_block=2,
        num_calibration_samples_width=1,
        batch_size=4,
        mesh_shape=MESH,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(
    options: pipeline.PruneOptions,
    process: int,
    port: int,
    timeout: int,
    env: dict[str, str] | None = None,
    **override,
) -> subprocess.Popen:
    flags = tiny_models.prune_flags(dataclasses.replace(options, **override))
    flags += [
        "--distributed",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={process}",
        f"--coordinator_timeout={timeout}",
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": REPO,
        **(env or {}),
    }
    script = os.path.join(REPO, "scripts", "prune.py")
    return subprocess.Popen(
        [sys.executable, script, *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _decisions(out) -> list[tuple[str, str, int]]:
    log = json.loads((out / "log.json").read_text())["steps"]
    return [(s["stage"], s["kind"], s["layer"]) for s in log]


def test_two_processes_take_the_decisions_of_one(tiny_model_dir, tmp_path):
    one = tmp_path / "one"
    pipeline.run(_options(tiny_model_dir, str(one)))
    two = tmp_path / "two"
    options, port = _options(tiny_model_dir, str(two)), _free_port()
    procs = [_launch(options, p, port, timeout=120) for p in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert _decisions(two) == _decisions(one)
    assert len(_decisions(one)) >= 2
    config = json.loads((two / "pruning_config.json").read_text())
    assert config == json.loads((one / "pruning_config.json").read_text())
    # One checkpoint, written by both processes into one folder, nothing left beside it.
    assert sorted(os.listdir(two)) == sorted([*os.listdir(one), "flags.txt"])
    assert (
        checkpoint.restore(str(two / "checkpoint")).spec
        == checkpoint.restore(str(one / "checkpoint")).spec
    )


def test_every_process_fails_when_one_does(tiny_model_dir, tmp_path):
    options, port = _options(tiny_model_dir, str(tmp_path / "out")), _free_port()
    options = dataclasses.replace(options, eval_windows=1)
    start = time.monotonic()
    missing = {"MULTIPRUNER_WIKITEXT2": str(tmp_path / "none.jsonl")}  # same flags, other data
    procs = [
        _launch(options, 0, port, timeout=15),
        _launch(options, 1, port, timeout=15, env=missing),
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert procs[1].returncode == 1
    assert "error (process 1 of 2): " in outs[1][1] and "none.jsonl" in outs[1][1]
    assert procs[0].returncode != 0
    # Process 0 fails in its next collective, or when the coordinator misses process 1.
    assert "error (process 0 of 2)" in outs[0][1] or "another task died" in outs[0][1]
    assert time.monotonic() - start < 200
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_an_unreachable_coordinator_is_one_sentence(tiny_model_dir, tmp_path):
    options = _options(tiny_model_dir, str(tmp_path / "out"))
    proc = _launch(options, 1, _free_port(), timeout=3)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: --distributed: the coordinator at localhost:")
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(num_processes=2, process_id=2), r"--process_id=2: expected 0 to 1"),
        (dict(num_processes=0, process_id=0), r"--num_processes=0: expected a positive count"),
        (dict(num_processes=2, process_id=0, timeout_s=0), r"--coordinator_timeout=0"),
    ],
)
def test_bad_distributed_flags_are_refused_before_joining(args, message):
    with pytest.raises(ValueError, match=message):
        mesh.initialize_distributed("localhost:1", **args)
    assert not jax.distributed.is_initialized()


def test_single_process_features_are_refused_in_a_multi_process_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    options = dataclasses.replace(
        _options(tiny_model_dir, str(tmp_path / "out")), export_hf=str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match="--export_hf runs in one process"):
        pipeline.check_options(options)
