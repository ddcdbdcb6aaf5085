"""Runs exported models in real serving engines from the main venv (tests, bench scripts).

Each engine lives in a venv of its own, built by `make engines` (pins in
engines/requirements.txt), and is driven by a runner script run with that venv's python as a
subprocess. Runners take token ids, never text; the request and output formats are described in
engines/runner_common.py and in each runner's docstring.

    from engines import harness
    if harness.available("mlx"):
        out = harness.run("mlx", "out/x/decilm", {"mode": "check", "prompts": [ids]})
        out["logits"]  # float32 [1, T, vocab]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the repository (venvs live at its top level)
HERE = Path(__file__).resolve().parent


class EngineError(RuntimeError):
    """An engine's venv is missing, or its runner failed or timed out."""


@dataclass(frozen=True)
class Engine:
    """One serving engine: its venv (relative to the repository), runner, and the model it takes
    (`gguf`: a .gguf file; `hf_dir`: an HF-style directory with config.json and safetensors)."""

    venv: str
    runner: str
    model_kind: str

    @property
    def python(self) -> Path:
        return ROOT / self.venv / "bin" / "python"


ENGINES: dict[str, Engine] = {
    "llamacpp": Engine(".venv-engines", "run_llamacpp.py", "gguf"),
    "mlx": Engine(".venv-engines", "run_mlx.py", "hf_dir"),
    "vllm": Engine(".venv-vllm", "run_vllm.py", "hf_dir"),
}

# Set for every runner. vLLM: 1 GiB of KV cache (the default would reserve a share of RAM) and
# the engine core in-process (no worker process to start or leak).
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; one of {sorted(ENGINES)}")
    return ENGINES[name]


def unavailable_reason(name: str) -> str | None:
    """None when the engine's venv is built, else why not (with the `make engines` hint); meant
    for `pytest.skip(reason)`."""
    engine = _engine(name)
    stamp = ROOT / engine.venv / ".installed"
    if engine.python.exists() and stamp.exists():
        return None
    return f"{name}: {engine.venv} is not built (run `make engines`; 10-25 min the first time)"


def available(name: str) -> bool:
    """Whether the engine's venv is built."""
    return unavailable_reason(name) is None


def _check_model(name: str, model: str) -> None:
    path = Path(model)
    kind = _engine(name).model_kind
    if kind == "gguf" and not (path.is_file() and path.suffix == ".gguf"):
        raise EngineError(f"{name} takes a .gguf file, got {model}")
    if kind == "hf_dir" and not (path / "config.json").is_file():
        raise EngineError(f"{name} takes an HF-style directory with config.json, got {model}")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    engine: str, model: str | os.PathLike, request: dict, timeout: float = 900.0
) -> dict[str, np.ndarray]:
    """Runs `request` (check or bench, see engines/runner_common.py) on `model` in `engine`.

    Returns the runner's npz as {name: array}. Raises EngineError when the venv is missing, the
    model is of the wrong kind, or the runner fails or runs past `timeout` seconds (the message
    holds the tail of its stderr).
    """
    reason = unavailable_reason(engine)
    if reason:
        raise EngineError(reason)
    model = str(Path(model).resolve())
    _check_model(engine, model)
    spec = ENGINES[engine]
    env = {**os.environ, **ENV}
    env.pop("PYTHONPATH", None)  # the main venv's packages must not leak into the engine's
    with tempfile.TemporaryDirectory(prefix=f"engine-{engine}-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "out.npz"
        req_path.write_text(json.dumps(request))
        cmd = [str(spec.python), str(HERE / spec.runner), "--model", model]
        cmd += ["--request", str(req_path), "--out", str(out_path)]
        try:
            proc = subprocess.run(
                cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            raise EngineError(
                f"{engine} runner timed out after {timeout:.0f} s on {model}; stderr tail:\n"
                f"{_tail(err or '')}"
            ) from None
        if proc.returncode != 0 or not out_path.exists():
            raise EngineError(
                f"{engine} runner failed (exit {proc.returncode}) on {model}; stderr tail:\n"
                f"{_tail(proc.stderr)}"
            )
        with np.load(out_path) as npz:
            return {k: npz[k] for k in npz.files}


def main() -> None:
    """`python -m engines.harness ENGINE MODEL REQUEST.json`: prints the result arrays' shapes
    (and small ones in full)."""
    engine, model, request = sys.argv[1:4]
    out = run(engine, model, json.loads(Path(request).read_text()))
    for k, v in out.items():
        print(k, v.shape, v.dtype, v if v.size <= 32 else "")


if __name__ == "__main__":
    main()
