"""Nothing lost, nothing silently wrong, one sentence for every bad input (prune, evaluate, export).

Each test pins one case that used to lose data, report a wrong result as success, or end in a
traceback. Runs that must be refused are checked to leave no output folder behind.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading

import orbax.checkpoint as ocp
import pytest
import tiny_models

from multipruner_jax.base import atomic, cli
from multipruner_jax.evals import evaluation
from multipruner_jax.exporting import export
from multipruner_jax.prune import pipeline, search
from multipruner_jax.storage import checkpoint, data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
    "prune.py",
    "evaluate.py",
    "export_hf.py",
    "prepare_assets.py",
    "generate.py",
    "finetune.py",
)
_opts = tiny_models.prune_options


def _script(name: str, *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """Run ``scripts/name`` (with ``umask``, which the child inherits, if given)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    old = os.umask(umask) if umask is not None else None
    try:
        return subprocess.run(
            [sys.executable, os.path.join(REPO, "scripts", name), *args],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        if old is not None:
            os.umask(old)


def _one_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 1, no traceback, and one ``error:`` line matching ``pattern``."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), done.stderr[-3000:]


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    """A finished 5 % search: its output folder and summary."""
    out = tmp_path_factory.mktemp("small_run")
    summary = pipeline.run(_opts(tiny_model_dir, out, target_ratio=5.0), flags_text="--x\n")
    return out, summary


# -- 1. replacing a checkpoint ----------------------------------------------------------------


def test_a_crash_while_deleting_the_old_checkpoint_leaves_a_complete_one(
    small_run, tmp_path, monkeypatch
):
    out, _ = small_run
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(out / "checkpoint", ckpt)
    model = checkpoint.restore(str(ckpt))
    real_rmtree = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):
        victim = next(p for p in sorted(os.listdir(path)) if p != checkpoint.SPEC_FILE)
        real_rmtree(os.path.join(path, victim))
        raise KeyboardInterrupt  # killed while the old checkpoint was being deleted

    monkeypatch.setattr(shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(ckpt), model)
    monkeypatch.undo()
    assert checkpoint.restore(str(ckpt)).spec == model.spec  # the new one, complete


def test_an_incomplete_checkpoint_is_refused_in_one_sentence(small_run, tmp_path):
    out, _ = small_run
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "checkpoint", damaged)
    os.remove(damaged / "params" / "_METADATA")
    with pytest.raises(checkpoint.CheckpointError, match="incomplete checkpoint"):
        checkpoint.restore(str(damaged))
    _one_error(_script("evaluate.py", f"--model_path={damaged}", "--windows=1"), "incomplete")
    done = _script("export_hf.py", f"--checkpoint={damaged}", f"--out={tmp_path / 'hf'}")
    _one_error(done, "incomplete checkpoint")
    assert not (tmp_path / "hf").exists()


def test_stale_temporary_checkpoints_are_removed_by_the_next_run(
    small_run, tiny_model_dir, tmp_path
):
    out, _ = small_run
    stale = tmp_path / ".checkpoint.tmp-deadbeef"
    stale.mkdir()
    (stale / "params").write_bytes(b"x" * 1000)
    config = str(out / "pruning_config.json")
    pipeline.run(_opts(tiny_model_dir, tmp_path, pruned_model_config_file=config))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "pruning_config.json"]


def test_a_full_disk_while_saving_is_one_sentence_and_leaves_no_temporary_files(
    small_run, tiny_model_dir, tmp_path, monkeypatch
):
    out, _ = small_run
    target = tmp_path / "run"

    def no_space(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", no_space)
    config = str(out / "pruning_config.json")
    with pytest.raises(OSError) as caught:
        pipeline.run(_opts(tiny_model_dir, target, pruned_model_config_file=config))
    assert cli.one_line(caught.value).endswith("No space left on device")
    assert not [name for name in os.listdir(target) if name.startswith(".")]
    assert not (target / "checkpoint").exists()


# -- 2. unreachable targets -------------------------------------------------------------------


def test_a_stage_without_candidates_is_refused_before_loading(tiny_model_dir, tmp_path):
    # llama_gqa: 2 KV groups of 4 query heads x 8 dims: 64 query channels are every group.
    done = _script(
        "prune.py",
        *tiny_models.prune_flags(_opts(tiny_model_dir, tmp_path / "out")),
        "--attn_channel_group_size=64",
        "--pruning_distribution=0:0:1",
        "--target_ratio=5",
    )
    _one_error(done, "asks the attention-head stage to reach 5.00% removed")
    assert not (tmp_path / "out").exists()


def test_a_stage_that_runs_out_ends_with_every_output_and_a_failure(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(search, "check_targets", lambda dense, settings: None)  # let it run
    opts = _opts(tiny_model_dir, tmp_path, target_ratio=80.0, pruning_distribution="0:1:0")
    with pytest.raises(pipeline.TargetNotReached, match="was not reached") as caught:
        pipeline.run(opts)
    summary = caught.value.summary
    assert not summary["target_reached"] and summary["ratio"] < 80.0
    assert "mlp_width stage ran out of candidates" in summary["shortfalls"][0]
    assert "NOT reached" in pipeline.format_summary(summary)
    assert checkpoint.restore(str(tmp_path / "checkpoint")).spec.num_layers == 4
    assert (tmp_path / "pruning_config.json").is_file()


# -- 3. configs of another model --------------------------------------------------------------


def test_a_config_of_another_model_is_refused_before_loading(small_run, tiny_model_dir, tmp_path):
    out, _ = small_run
    config = json.loads((out / "pruning_config.json").read_text())
    for key in ("pruned_attn_width", "pruned_mlp_width"):
        config[key] = {k: v for k, v in config[key].items() if int(k) < 2}
    path = tmp_path / "short.json"
    path.write_text(json.dumps(config))
    opts = _opts(tiny_model_dir, tmp_path / "out", pruned_model_config_file=str(path))
    _one_error(
        _script("prune.py", *tiny_models.prune_flags(opts)),
        r"lacks layers 2\.\.3 of the 4-layer model",
    )
    assert not (tmp_path / "out").exists()


def test_a_config_with_the_other_reorder_flag_is_refused_before_loading(
    small_run, tiny_model_dir, tmp_path
):
    out, _ = small_run
    opts = _opts(
        tiny_model_dir,
        tmp_path / "out",
        weight_reorder=False,
        pruned_model_config_file=str(out / "pruning_config.json"),
    )
    with pytest.raises(ValueError, match="weight_reorder=True"):
        pipeline.check_options(opts)


# -- 4. resume --------------------------------------------------------------------------------


def test_a_refused_resume_leaves_flags_txt_alone(small_run, tiny_model_dir):
    out, _ = small_run
    before = (out / "flags.txt").read_text()
    opts = _opts(tiny_model_dir, out, resume=True, target_ratio=7.0)
    with pytest.raises(ValueError, match="other options"):
        pipeline.run(opts, flags_text="--refused\n")
    assert (out / "flags.txt").read_text() == before


def test_resume_compares_options_by_meaning(small_run, tiny_model_dir, monkeypatch):
    out, summary = small_run
    monkeypatch.chdir(os.path.dirname(tiny_model_dir))
    opts = _opts(
        os.path.basename(tiny_model_dir),  # the same model, given relatively
        out,
        resume=True,
        target_ratio=5,
        pruning_distribution=" 22 : 26 : 2 ",  # 44:52:4 halved, with spaces
    )
    assert pipeline.check_options(opts).state.steps  # accepted: the saved steps replay


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "not a valid search state"),
        (lambda text: text.replace('"layer": ', '"layer": 1', 1), "not a valid search state"),
        (lambda text: text.replace('"steps"', '"stepz"'), "not a valid search state"),
    ],
)
def test_a_damaged_search_state_is_one_sentence(
    small_run, tiny_model_dir, tmp_path, damage, message
):
    out, _ = small_run
    shutil.copy(out / "search_state.json", tmp_path / "search_state.json")
    path = tmp_path / "search_state.json"
    path.write_text(damage(path.read_text()))
    opts = _opts(tiny_model_dir, tmp_path, resume=True, target_ratio=5.0)
    _one_error(_script("prune.py", *tiny_models.prune_flags(opts)), message)


# -- 6./7. one sentence, before loading ---------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(token_chunk=0), "--token_chunk=0"),
        (dict(eval_windows=-2), "--eval_windows=-2"),
        (dict(mesh_shape="4,4", batch_size=4), "needs 16 devices; 8 are available"),
        (dict(calibration_dataset="/nonexistent/text"), "text source '/nonexistent/text'"),
        (dict(eval_windows=2, eval_dataset="ptb"), "evaluation source 'ptb'"),
        (dict(model_path="models/no_such_model"), "does not exist"),
        (dict(export_hf="EXISTING"), "--export_hf=.* exists and is not empty"),
        (dict(export_hf="OUT", export_overwrite=True), "would replace --output_path"),
        (dict(export_hf="OUT/checkpoint", export_overwrite=True), "would replace --output_path"),
        (dict(export_hf="PARENT", export_overwrite=True), "would replace --output_path"),
    ],
)
def test_bad_options_are_one_sentence_before_loading(
    tiny_model_dir, tmp_path, change, message, monkeypatch
):
    monkeypatch.chdir(REPO)  # "models/" exists here, so models/no_such_model is local
    if change.get("export_hf") == "EXISTING":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "x").write_text("x")
        change = dict(export_hf=str(tmp_path / "hf"))
    for name, path in (("OUT", tmp_path / "out"), ("PARENT", tmp_path)):
        if change.get("export_hf", "").startswith(name):
            change = dict(change, export_hf=change["export_hf"].replace(name, str(path), 1))
    with pytest.raises((ValueError, OSError), match=message):
        pipeline.check_options(_opts(tiny_model_dir, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_output_paths_that_cannot_be_written(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    _one_error(
        _script("prune.py", *tiny_models.prune_flags(_opts(tiny_model_dir, tmp_path / "file"))),
        "exists and is not a directory",
    )
    unwritable = "/proc/multipruner-out"  # /proc refuses new entries, even to root
    _one_error(
        _script("prune.py", *tiny_models.prune_flags(_opts(tiny_model_dir, unwritable))),
        "cannot write in /proc",
    )


def test_a_failure_while_loading_leaves_no_folder_with_only_flags(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 64  # the tensors are 96 wide
    (broken / "config.json").write_text(json.dumps(config))
    opts = _opts(str(broken), tmp_path / "out", mlp_channel_group_size=32)
    _one_error(_script("prune.py", *tiny_models.prune_flags(opts)), r"down_proj\.weight .* implies")
    assert not (tmp_path / "out").exists()


def test_evaluate_and_export_errors_name_the_flag(small_run, tmp_path):
    out, _ = small_run
    _one_error(
        _script("evaluate.py", f"--model_path={out}", "--seqlen=0"), "--seqlen=0: expected at least"
    )
    done = _script(
        "export_hf.py", f"--checkpoint={out}", f"--out={tmp_path / 'hf'}", "--max_shard_gb=0"
    )
    _one_error(done, "--max_shard_gb=0: expected a positive size")
    assert not (tmp_path / "hf").exists()


def test_the_prune_output_folder_works_where_a_checkpoint_is_expected(small_run, tmp_path):
    out, summary = small_run
    options = evaluation.EvalOptions(str(out), seqlen=32, windows=2, mesh_shape="1,1", tasks="")
    result = evaluation.evaluate(options)
    assert result["params"] == summary["pruned_params"]
    export.export_checkpoint(str(out), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()


def test_bad_text_files_name_the_file_and_line(tmp_path):
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"records\.jsonl:4: not valid JSON \(Expecting value\)"):
        data.load_records(str(jsonl))
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text"):
        data.load_records(str(txt))


# -- 8. umask ---------------------------------------------------------------------------------


def test_outputs_follow_the_umask(small_run, tiny_model_dir, tmp_path):
    out, _ = small_run
    run = tmp_path / "run"
    opts = _opts(
        tiny_model_dir,
        run,
        pruned_model_config_file=str(out / "pruning_config.json"),
        export_hf=str(tmp_path / "hf"),
    )
    done = _script("prune.py", *tiny_models.prune_flags(opts), umask=0o022)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in [run / "flags.txt", run / "pruning_config.json", tmp_path / "hf" / "config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in [run, run / "checkpoint", run / "checkpoint" / "params", tmp_path / "hf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path
    spec = run / "checkpoint" / checkpoint.SPEC_FILE
    assert stat.S_IMODE(spec.stat().st_mode) == 0o644


# -- 9. usability -----------------------------------------------------------------------------


def test_logs_are_quiet_unless_asked(small_run, tiny_model_dir, tmp_path):
    out, _ = small_run
    config = str(out / "pruning_config.json")
    opts = _opts(tiny_model_dir, tmp_path / "a", pruned_model_config_file=config, quiet=False)
    quiet = _script("prune.py", *tiny_models.prune_flags(opts))
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "orbax" not in quiet.stderr and "backend 'tpu'" not in quiet.stderr
    assert "checkpoint:" in quiet.stdout
    opts = _opts(tiny_model_dir, tmp_path / "b", pruned_model_config_file=config)
    loud = _script("prune.py", *tiny_models.prune_flags(opts), "--verbosity=0")
    assert "orbax" in loud.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_every_flag_is_explained_in_the_readme(script):
    done = _script(script, "--help")
    assert done.returncode == 0, done.stderr
    entries = re.findall(r"^  --(?:\[no\])?(\w+): (.*)$", done.stdout, re.MULTILINE)
    assert entries, done.stdout
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for name, text in entries:
        assert text.strip(), f"{script} --{name} has no help text"
        assert f"--{name}" in readme, f"README does not list {script} --{name}"


def test_atomic_writes_leave_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic.directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_orbax_write_errors_become_one_sentence_naming_the_checkpoint(monkeypatch):
    """tensorstore reports a full disk as a ValueError carrying the OS error code (seen on a
    160 KB tmpfs); it becomes an OSError naming the checkpoint, and orbax's background-thread
    error logs are silenced meanwhile."""
    message = (
        'RESOURCE_EXHAUSTED: Error writing "model.layers.0.mlp.down_proj.kernel/0.0" in OCDBT '
        "database: Failed to write 352788 bytes to file 6: No space left on device "
        "[os_error_code='28']"
    )
    absl_logger = logging.getLogger("absl")
    asyncio_logger = logging.getLogger("asyncio")
    for logger in (absl_logger, asyncio_logger):  # restored after the test
        monkeypatch.setattr(logger, "filters", list(logger.filters))
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    error = logging.LogRecord("absl", logging.ERROR, __file__, 1, "thread failed", None, None)
    late = logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved", None, None
    )
    info = logging.LogRecord("absl", logging.INFO, __file__, 1, "saving", None, None)
    with pytest.raises(OSError) as caught:
        with checkpoint.orbax_errors("/out/run/checkpoint"):
            assert not absl_logger.filter(error) and absl_logger.filter(info)
            raise ValueError(message)
    assert cli.one_line(caught.value) == "/out/run/checkpoint: No space left on device"
    # The failed write's other threads finish later: their reports stay dropped.
    assert not absl_logger.filter(error) and not asyncio_logger.filter(late)
    monkeypatch.undo()
    assert absl_logger.filter(error) and asyncio_logger.filter(late)
    with checkpoint.orbax_errors("/out/run/checkpoint"):
        pass  # a write that succeeds leaves every filter as it was
    assert absl_logger.filter(error) and asyncio_logger.filter(late)
    with pytest.raises(KeyError):
        with checkpoint.orbax_errors("/out/run/checkpoint"):
            raise KeyError("not an OS error: unchanged")


def test_late_event_loop_tracebacks_are_dropped_and_others_pass():
    """tensorstore's callbacks print "Event loop is closed" tracebacks from their own threads,
    in pieces and interleaved with other output; exactly those are dropped."""
    out = io.StringIO()
    stream = checkpoint._LateTracebackFilter(out)
    late = [
        "Traceback (most recent call last):\n",
        '  File "base_events.py", line 806, in call_soon_threadsafe\n',
        "    self._check_closed()\n",
        "RuntimeError: Event loop is closed\n",
    ]
    other = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'a'\n"

    def write_late():  # the header in one write (as Python writes it), the rest in pieces
        for _ in range(50):
            stream.write(late[0])
            for piece in late[1:]:
                stream.write(piece[:5])
                stream.write(piece[5:])

    threads = [threading.Thread(target=write_late) for _ in range(4)]
    for thread in threads:
        thread.start()
    stream.write("error: /out/run/checkpoint: No space left on device\n")
    for thread in threads:
        thread.join()
    stream.write(other + "partial")
    assert out.getvalue() == (
        "error: /out/run/checkpoint: No space left on device\n" + other + "partial"
    )


def test_a_real_write_failure_in_the_prune_checkpoint_prints_one_line(tiny_model_dir, tmp_path):
    """A real OS error inside tensorstore's writes (a file-size limit: the tiny model's orbax
    data files exceed 10 kB, every other file of the run stays below) ends the run with one
    line, no traceback and no temporary folder (before: 6-28 tracebacks around the line)."""
    out = tmp_path / "run"
    flags = tiny_models.prune_flags(_opts(tiny_model_dir, out, target_ratio=5.0, mesh_shape="1,1"))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "prune.py"), *flags],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr == f"error: {out / checkpoint.DIR}: File too large\n"
    assert sorted(os.listdir(out)) == [
        "flags.txt",
        "log.json",
        "pruned_model_configs",
        "pruning_config.json",
        "search_state.json",
    ]
