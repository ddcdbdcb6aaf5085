"""What every script shares: absl start-up, quiet logs, ``--help`` that exits 0, one-line errors.

A script defines its flags and a ``main()`` that calls one library function, then calls
``cli.run(main)``. Library errors about the user's input (a bad flag, file or config) are
``ValueError``/``OSError`` subclasses; they end the run with ``error: <one sentence>`` on stderr
and exit status 1, without a traceback. Other exceptions are bugs and keep their traceback.

Logs: absl raises the verbosity to INFO by default, which shows orbax's ~30 lines per checkpoint
and JAX's backend probe ("Unable to initialize backend 'tpu'"). Unless ``--verbosity`` (``-v``) is
given, only warnings and errors are logged.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull")
USER_ERRORS = (ValueError, OSError)


def run(main: Callable[[], object]) -> None:
    """Parse flags and run ``main()``; see the module docstring."""
    help_asked = any(arg.split("=")[0] in HELP_FLAGS for arg in sys.argv[1:])
    try:
        app.run(lambda argv: _main(main, argv))
    except SystemExit as exit_:
        if help_asked and exit_.code == 1:  # absl exits 1 after printing --help
            sys.exit(0)
        raise


def _main(main: Callable[[], object], argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        main()
    except USER_ERRORS as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1
    return 0


def options_from_flags(cls: type, module: str) -> tuple[Any, str]:
    """The dataclass ``cls`` filled from the flags script ``module`` defines (fields it has),
    and those flags as flagfile text (``flags.txt``)."""
    names = [f.name for f in flags.FLAGS.get_key_flags_for_module(sys.modules[module])]
    fields = {f.name for f in dataclasses.fields(cls)}
    options = cls(**{n: flags.FLAGS[n].value for n in names if n in fields})
    lines = [flags.FLAGS[n].serialize() for n in names if flags.FLAGS[n].value is not None]
    return options, "\n".join(lines) + "\n"


def one_line(error: BaseException) -> str:
    """The error's message on a single line (``OSError``: strerror and the file)."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    text = str(error) or type(error).__name__
    return " ".join(text.split())
