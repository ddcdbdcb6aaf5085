"""The job skeleton: flags generated from an options dataclass, and the job folder's rules."""

from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from multipruner_jax.base import cli
from multipruner_jax.storage import job


@dataclasses.dataclass(frozen=True)
class _Options:
    model_path: str = cli.option(help="The model.")
    rows: int = cli.option(3, "Rows per batch.")
    rate: float = cli.option(0.5, "A rate.")
    resume: bool = cli.option(False, "Continue.")
    cache: str | None = cli.option(None, "A cache folder.")
    dtype: str = cli.option("float32", "The dtype.", choices=("float32", "bfloat16"))
    internal: int = 7  # no option: no flag


def _flags() -> flags.FlagValues:
    values = flags.FlagValues()
    cli.define_flags(_Options, "some_script", values)
    return values


def test_every_option_becomes_a_flag_with_its_default_type_and_help():
    values = _flags()
    assert sorted(values) == ["cache", "dtype", "model_path", "rate", "resume", "rows"]
    assert [f.name for f in values.get_key_flags_for_module("some_script")] == [
        "model_path",
        "rows",
        "rate",
        "resume",
        "cache",
        "dtype",
    ]
    assert values["rows"].default == 3 and values["rows"].help == "Rows per batch."
    assert values["cache"].default is None and values["resume"].boolean
    values(["prog", "--model_path=m", "--rows=5", "--rate=2", "--resume", "--dtype=bfloat16"])
    assert (values.model_path, values.rows, values.rate, values.resume) == ("m", 5, 2.0, True)
    assert values.dtype == "bfloat16"


def test_a_field_without_default_is_a_required_flag_and_choices_are_enforced():
    with pytest.raises(flags.IllegalFlagValueError, match="model_path"):
        _flags()(["prog"])
    with pytest.raises(flags.IllegalFlagValueError, match="dtype"):
        _flags()(["prog", "--model_path=m", "--dtype=float16"])


def test_an_option_needs_help_text():
    with pytest.raises(ValueError, match="help text"):
        cli.option(1)


def test_the_job_folder_refuses_files_and_the_wrong_start(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--output_path is required"):
        job.JobFolder("").check()
    with pytest.raises(ValueError, match=r"--output_path=.*file exists and is not a directory"):
        job.JobFolder(str(tmp_path / "file")).check()
    folder = job.JobFolder(str(tmp_path / "out"))
    folder.check()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="nothing to resume"):
        folder.check_start("state.json", resume=True, what="a run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "state.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        folder.check_start("state.json", resume=False, what="a run")
    assert folder.check_start("state.json", resume=True, what="a run").endswith("state.json")


def test_a_resume_names_every_option_that_differs():
    job.check_resume_identity({"a": 1, "b": 2}, {"a": 1, "b": 2}, "run", "out")
    with pytest.raises(ValueError) as refused:
        job.check_resume_identity({"a": 1, "b": 2, "c": 0}, {"a": 1, "b": 3, "c": 1}, "run", "out")
    assert str(refused.value) == (
        "--resume: --b, --c differ from the run saved in out, which used other options "
        "(saved, now): {'b': (2, 3), 'c': (0, 1)}"
    )


def test_flags_txt_is_written_once_given(tmp_path):
    folder = job.JobFolder(str(tmp_path / "out"))
    folder.write_flags(None)
    assert not (tmp_path / "out").exists()
    folder.write_flags("--x=1\n")
    assert (tmp_path / "out" / job.FLAGS_FILE).read_text() == "--x=1\n"
