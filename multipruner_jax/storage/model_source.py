"""Where a model lives on disk: a local HF directory, or a Hub repo fetched once (real users)."""

from __future__ import annotations

import os

_CONFIG_FILES = ["*.json", "tokenizer*", "*.model", "*.txt"]
_WEIGHT_FILES = ["*.safetensors"]


def canonical(source: str) -> str:
    """``source`` made absolute (links resolved) when it exists locally, else unchanged (a Hub id
    or dataset name): how a resumed run compares the paths it was given."""
    return os.path.realpath(source) if os.path.exists(source) else source


def resolve(path: str, *, weights: bool = True) -> str:
    """A local directory for ``path``: the directory itself, or a Hub snapshot of repo id ``path``
    (configs and tokenizer only unless ``weights``; a later call with weights adds them).

    A path that names anything local (it starts with ``.``, ``/`` or ``~``, exists as a file, or its
    first component is a local directory) is never taken for a Hub id.
    """
    if os.path.isdir(path):
        return path
    first = path.split("/", 1)[0]
    local = path.startswith((".", "/", "~")) or os.path.exists(path) or os.path.isdir(first)
    if local or path.count("/") != 1:
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"--model_path={path!r} {what}; expected an HF model directory or a Hub id 'org/name'"
        )
    from huggingface_hub import snapshot_download

    patterns = _CONFIG_FILES + (_WEIGHT_FILES if weights else [])
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, gated repo, network: all one answer
        raise FileNotFoundError(
            f"--model_path={path!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
