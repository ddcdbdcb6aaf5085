"""The status line shared by the search's and the zero-shot evaluation's progress output."""

from __future__ import annotations

import io

from multipruner_jax.base.console import StatusLine
from multipruner_jax.prune.progress import ConsoleProgress
from multipruner_jax.prune.search import Step


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_interval_and_the_last_one():
    stream = io.StringIO()
    status = StatusLine(stream, every=1000.0)
    status.show("first")
    status.show("throttled")
    status.show("last", final=True)
    status.clear()
    assert stream.getvalue() == "first\nlast\n"


def test_a_terminal_gets_every_line_rewritten_in_place():
    stream = Terminal()
    status = StatusLine(stream, every=1000.0)
    status.show("a")
    status.show("b")
    status.show("c", final=True)
    assert stream.getvalue() == "\r\033[Ka\r\033[Kb\r\033[Kc\n"


def test_an_accepted_step_replaces_the_open_candidate_line_on_a_terminal():
    stream = Terminal()
    progress = ConsoleProgress(stream, every=1000.0)
    progress.candidate("block", 0, 2, 2, 30.5, 0.0, 0.0, 12.0)
    step = Step(0, "block", "attn", 3, 30.5, 0.66, 2.0, 2, 1.5, 1)
    progress.accepted(step, 10.0)
    lines = stream.getvalue().split("\r\033[K")
    assert lines[1].startswith("[block] step 0: candidates 2/2") and "\n" not in lines[1]
    assert lines[2].startswith("[block] step 0: removed attn block of layer 3 -> ppl 30.5000")
    assert lines[2].endswith(", search ETA ~0:00:10\n")
