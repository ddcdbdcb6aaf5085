"""Where a model lives on disk: a local HF directory, or a Hub id fetched once (real users)."""

from __future__ import annotations

import os


def resolve(path: str) -> str:
    """A local directory for ``path``: the directory itself, or a Hub snapshot of that repo id."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise FileNotFoundError(
            f"--model_path={path!r}: expected an HF model directory or a Hub id 'org/name'"
        )
    from huggingface_hub import snapshot_download

    return snapshot_download(
        path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    )
