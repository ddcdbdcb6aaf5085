"""What every script shares: absl start-up, quiet logs, ``--help`` that exits 0, one-line errors.

A script declares its flags and a ``main()`` that calls one library function, then calls
``cli.run(main)``. A job's flags are declared once, on its options dataclass: every field made
with ``option(default, help, choices=...)`` becomes the flag of the same name, type and default
(``define_flags``), with that help text; a field without a default is a required flag. Only
flags that are no option of the job (joining a multi-process run, say) are defined by hand.

Library errors about the user's input (a bad flag, file or config) are ``ValueError``/``OSError``
subclasses; they end the run with ``error: <one sentence>`` on stderr and exit status 1, without
a traceback. Other exceptions are bugs and keep their traceback.

A flag that was removed stays defined as *retired* (``retire_flag``), so that the flagfiles
written before (every run's ``flags.txt``) still parse: the one value it had left is accepted and
ignored, any other is refused in one sentence saying why the flag went.

Logs: absl raises the verbosity to INFO by default, which shows orbax's ~30 lines per checkpoint
and JAX's backend probe ("Unable to initialize backend 'tpu'"). Unless ``--verbosity`` (``-v``) is
given, only warnings and errors are logged.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull")
USER_ERRORS = (ValueError, OSError)
_RETIRED: dict[str, tuple[str, str]] = {}  # flag name -> (the value still accepted, why it went)


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
        _check_retired()
        main()
    except USER_ERRORS as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1
    return 0


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Sequence[str] = ()):
    """A field of an options dataclass that is also a flag: ``help`` is its help text,
    ``choices`` (when given) the values it accepts."""
    if not help:
        raise ValueError("an option needs its help text")
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices)})


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}


def define_flags(cls: type, module: str, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define one absl flag per ``option`` field of the dataclass ``cls``, as key flags of the
    script ``module`` (its ``__name__``): the field's name, default and help; ``choices`` make an
    enum; ``bool`` fields are ``--name``/``--noname``; ``str | None`` fields default to unset."""
    module_name = sys.argv[0] if module == "__main__" else module  # absl's name for a script
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if "help" not in field.metadata:
            continue
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # ``X | None``
            (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        common = dict(flag_values=flag_values, module_name=module_name, required=required)
        help_text = field.metadata["help"]
        if field.metadata["choices"]:
            choices = list(field.metadata["choices"])
            flags.DEFINE_enum(field.name, default, choices, help_text, **common)
        elif kind is bool:
            flags.DEFINE_bool(field.name, default, help_text, **common)
        else:
            _DEFINE[kind](field.name, default, help_text, **common)


def define_distributed_flags(module: str) -> None:
    """The flags that join a multi-process run, as flags of the script ``module``."""
    key = dict(module_name=module)
    flags.DEFINE_bool(
        "distributed", False, "Join a multi-process run (jax.distributed) first.", **key
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (auto on Cloud TPU).", **key
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the run (auto on Cloud TPU).", **key)
    flags.DEFINE_integer("process_id", None, "This process's index (auto on Cloud TPU).", **key)
    flags.DEFINE_integer(
        "coordinator_timeout", 120, "Seconds to reach the coordinator or a peer.", **key
    )


def join_if_distributed() -> None:
    """Join the multi-process run that ``--distributed`` asks for (before any other JAX work)."""
    if flags.FLAGS.distributed:
        from multipruner_jax.base import mesh

        mesh.initialize_distributed(
            flags.FLAGS.coordinator_address,
            flags.FLAGS.num_processes,
            flags.FLAGS.process_id,
            flags.FLAGS.coordinator_timeout,
        )


def retire_flag(name: str, accepted: str, why: str) -> None:
    """Keep ``--name`` parseable for old flagfiles: ``accepted`` is ignored, any other value is
    refused before ``main`` runs, with ``why`` (see the module docstring)."""
    flags.DEFINE_string(name, None, f"Retired ({why}); only {accepted!r} is accepted.")
    _RETIRED[name] = (accepted, why)


def _check_retired() -> None:
    for name, (accepted, why) in _RETIRED.items():
        value = flags.FLAGS[name].value
        if value is not None and value != accepted:
            raise ValueError(
                f"--{name}={value}: this flag was removed ({why}); delete it from the "
                "command line or flagfile"
            )


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
