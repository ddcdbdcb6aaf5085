"""Issue 17: processes that agree, output folders that one run owns, leftovers of dead writers.

Multi-process cases run 2 local processes x 4 CPU devices (as ``test_distributed``); folder
ownership is checked with a second process holding the lock, and with killed writers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tiny_models
from test_distributed import _free_port, _launch, _options

from multipruner_jax.base import atomic, ownership
from multipruner_jax.finetune import recovery
from multipruner_jax.prune import pipeline
from multipruner_jax.storage import agreement, assets, checkpoint, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold_lock(folder) -> subprocess.Popen:
    """Another live process that owns ``folder`` (prints ``held`` once it does)."""
    code = (
        "import sys, time\n"
        "from multipruner_jax.base import ownership\n"
        "with ownership.lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# -- multi-process option agreement ----------------------------------------------------------


@pytest.mark.parametrize(
    "change, flag",
    [(dict(target_ratio=10.0), "target_ratio"), (dict(seqlen=16), "seqlen")],
)
def test_processes_with_different_options_all_fail_at_once(tiny_model_dir, tmp_path, change, flag):
    out = tmp_path / "out"
    options, port = _options(tiny_model_dir, str(out)), _free_port()
    start = time.monotonic()
    procs = [_launch(options, 0, port, timeout=20), _launch(options, 1, port, 20, **change)]
    outs = [p.communicate(timeout=300) for p in procs]
    for process, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 1, err[-3000:]
        assert f"error (process {process} of 2): --{flag} differs between process 0 and " in err
        assert "Traceback" not in err
    assert time.monotonic() - start < 120
    assert not out.exists()


def _finetune_options(model_dir: str, tmp_path, **changes) -> recovery.FinetuneOptions:
    records = tmp_path / "records.txt"
    records.write_text("\n\n".join(data.load_records(str(assets.sotu_dir()))[:40]) + "\n")
    base = dict(
        model_path=model_dir,
        output_path=str(tmp_path / "out"),
        data=str(records),
        eval_examples=8,
        max_len=64,
        micro_batch_size=8,
        max_steps=2,
        warmup_steps=1,
        mesh_shape="8,1",
        quiet=True,
    )
    return recovery.FinetuneOptions(**{**base, **changes})


def _finetune_processes(options, *changes: dict) -> list[tuple[int, str, str]]:
    """``finetune.py`` as processes 0 and 1 of a local run (``changes``: per process)."""
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": REPO,
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "scripts", "finetune.py"),
                *tiny_models.prune_flags(dataclasses.replace(options, **change)),
                "--distributed",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={process}",
                "--coordinator_timeout=20",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process, change in enumerate(changes)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outs, strict=True)]


def test_two_fine_tuning_processes_train_one_model(tiny_model_dir, tmp_path):
    """Two processes of 4 devices fine-tune as one: both finish, only process 0 writes, and the
    held-out losses equal those of one process with the same 8 devices on its data axis."""
    options = _finetune_options(tiny_model_dir, tmp_path)
    done = _finetune_processes(options, {}, {})
    for code, _, err in done:
        assert code == 0, err[-3000:]
    one_out = tmp_path / "one"
    recovery.finetune(dataclasses.replace(options, output_path=str(one_out)))
    two, one = (
        json.loads((out / "log.json").read_text())["evals"] for out in (tmp_path / "out", one_out)
    )
    assert [e["step"] for e in two] == [e["step"] for e in one] == [0, 2]
    np.testing.assert_allclose([e["loss"] for e in two], [e["loss"] for e in one], rtol=1e-5)


def test_a_mesh_that_leaves_out_a_process_is_one_sentence(tiny_model_dir, tmp_path):
    """Before: process 1 failed inside jax.make_array_from_callback ("no addressable shards")
    and process 0 with a Gloo error while writing its first checkpoint."""
    options = _finetune_options(tiny_model_dir, tmp_path, mesh_shape="4,1", micro_batch_size=4)
    for process, (code, _, err) in enumerate(_finetune_processes(options, {}, {})):
        assert code == 1, err[-3000:]
        assert err.splitlines()[-1] == (
            f"error (process {process} of 2): mesh shape (1, 4, 1) uses 4 of the 8 devices of "
            "a 2-process run; expected a mesh over all of them (every process must hold its "
            "part of the mesh)"
        )


def test_fine_tuning_processes_with_different_options_all_fail_at_once(tiny_model_dir, tmp_path):
    """finetune.py joins a local multi-process run with the same flags as prune.py, and its
    processes compare their options before any work."""
    options = _finetune_options(tiny_model_dir, tmp_path)
    start = time.monotonic()
    outs = _finetune_processes(options, {"learning_rate": 1e-3}, {"learning_rate": 2e-3})
    for process, (code, _, err) in enumerate(outs):
        assert code == 1, err[-3000:]
        expected = f"error (process {process} of 2): --learning_rate differs between process 0 and "
        assert expected in err, err[-3000:]
        assert "Traceback" not in err
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists()


def test_option_hashes_name_the_first_difference(tmp_path):
    a = tiny_models.prune_options(str(tmp_path), tmp_path / "out")
    b = dataclasses.replace(a, seqlen=64, target_ratio=5.0)
    ha = agreement.option_hashes(agreement.resolved(a))
    hb = agreement.option_hashes(agreement.resolved(b))
    names = list(agreement.resolved(a))
    assert names[agreement.first_difference(ha, hb)] == "target_ratio"
    assert agreement.first_difference(ha, ha) == -1
    # The same folder named relative to another working directory is the same option.
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        c = dataclasses.replace(a, output_path="out")
        assert agreement.first_difference(ha, agreement.option_hashes(agreement.resolved(c))) == -1
    finally:
        os.chdir(here)


def test_a_coordinator_address_without_a_port_is_refused_up_front(tiny_model_dir, tmp_path):
    options = _options(tiny_model_dir, str(tmp_path / "out"))
    flags = tiny_models.prune_flags(options)
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "prune.py"), *flags]
        + ["--distributed", "--coordinator_address=localhost", "--num_processes=2"]
        + ["--process_id=0"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --coordinator_address='localhost': expected host:port"
    )


def test_a_process_that_never_joins_is_one_sentence(tiny_model_dir, tmp_path):
    options = _options(tiny_model_dir, str(tmp_path / "out"))
    proc = _launch(options, 0, _free_port(), timeout=4)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "Check failure" not in err and "@ " not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: --distributed: the run at localhost:"), (
        err[-3000:]
    )
    assert not (tmp_path / "out").exists()


def test_sigterm_ends_a_distributed_run(tiny_model_dir, tmp_path):
    options = dataclasses.replace(
        _options(tiny_model_dir, str(tmp_path / "out")), quiet=False, target_ratio=30.0
    )
    port = _free_port()
    procs = [_launch(options, p, port, timeout=30) for p in (0, 1)]
    try:
        lines = iter(procs[0].stdout.readline, "")
        assert any(line.startswith("calibration:") for line in lines)  # joined and agreed
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)
            assert p.returncode == -signal.SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- one run per output folder -----------------------------------------------------------------


def test_a_second_prune_on_a_live_runs_folder_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(ownership.FolderBusy) as caught:
            pipeline.run(tiny_models.prune_options(tiny_model_dir, out, target_ratio=5.0))
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert message.startswith(f"--output_path={out} is in use by another run (host ")
    assert f"pid {holder.pid})" in message
    assert not out.exists()
    # The holder was killed: its lock file is left, but free, and taken over.
    assert ownership.lock_file(out).exists()
    pipeline.run(tiny_models.prune_options(tiny_model_dir, out, target_ratio=5.0))
    assert (out / "checkpoint" / "spec.json").is_file()
    assert not ownership.lock_file(out).exists()


def test_a_checkpoint_write_of_a_live_run_is_never_removed(tmp_path):
    final = tmp_path / "checkpoint"
    live = tmp_path / ".checkpoint.tmp-0badcafe"
    live.mkdir()
    holder = _hold_lock(final)
    try:
        with pytest.raises(ownership.FolderBusy, match="is in use by another run"):
            with atomic.directory(final):
                pass
        assert live.is_dir()
    finally:
        holder.kill()
        holder.wait()
    with atomic.directory(final) as tmp:
        (tmp / "x").write_text("new")
    assert not live.exists() and (final / "x").read_text() == "new"


def test_an_incomplete_checkpoint_is_never_renamed_into_place(tmp_path):
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "spec.json").write_text("{}")
    with pytest.raises(ValueError, match=r"incomplete \(params/_METADATA"):
        with atomic.directory(final, incomplete=checkpoint._incomplete) as tmp:
            (tmp / "spec.json").write_text("{}")
            (tmp / "params").mkdir()
    assert os.listdir(tmp_path) == ["checkpoint"]
    assert os.listdir(final) == ["spec.json"]


def test_a_kill_between_the_two_renames_keeps_the_old_version(tmp_path):
    final = tmp_path / "export"
    old = tmp_path / ".export.old-12345678-999999-elsewhere"
    old.mkdir()
    (old / "weights").write_text("old")
    (tmp_path / ".export.tmp-87654321").mkdir()  # the new one, never renamed in
    with ownership.lock(final):
        atomic.recover(final)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert (final / "weights").read_text() == "old"
    (tmp_path / ".export.old-12345678").mkdir()  # a finished replace's leftover
    with atomic.directory(final) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], text=True, capture_output=True
    ).stdout.strip()
    gone = tmp_path / f".a.npy.tmp-0123abcd-{dead}-{ownership.HOST}"
    alive = tmp_path / f".b.npy.tmp-0123abcd-{os.getppid()}-{ownership.HOST}"
    elsewhere = tmp_path / f".c.npy.tmp-0123abcd-{dead}-another-host"
    unknown = tmp_path / ".d.npy.tmp-0123abcd"
    for path in (gone, alive, elsewhere, unknown):
        path.write_bytes(b"x")
    atomic.remove_dead_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive, elsewhere, unknown)
    )


def test_a_symlinked_checkpoint_is_refused_before_any_work(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "checkpoint")
    with pytest.raises(ValueError, match="is a symbolic link"):
        pipeline.run(tiny_models.prune_options(tiny_model_dir, out, target_ratio=5.0))
    assert sorted(os.listdir(out)) == ["checkpoint"]
