"""What the three engine runners share: the CLI, the request, bench token ids, the npz output.

Runs inside an engine's venv (numpy and the standard library only; nothing of the project, no
jax). The runners import it as a sibling module (`python engines/run_x.py` puts `engines/` on
`sys.path`).

Request JSON (one per run):

* check: `{"mode": "check", "prompts": [[ids...], ...], "greedy_tokens": 16, "top_k": 20}`.
  All prompts must have the same length T (the outputs are dense arrays).
* bench: `{"mode": "bench", "prompt_tokens": 512, "decode_tokens": 128, "repeats": 3,
  "warmup": 1, "threads": 2, "seed": 0, ...}`: `warmup` untimed rounds (default 1) first, then
  `repeats` timed ones, each on a fresh sequence of the same `bench_ids` tokens. Engine-specific
  keys are documented in each runner.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Request = dict[str, Any]
Arrays = dict[str, np.ndarray]


def parse_args(description: str) -> argparse.Namespace:
    """The common CLI: `--model PATH --request FILE.json --out FILE.npz`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="GGUF file or HF-style model directory")
    parser.add_argument("--request", required=True, help="request JSON (check or bench)")
    parser.add_argument("--out", required=True, help="output .npz")
    return parser.parse_args()


def load_request(path: str) -> Request:
    """Reads the request and, for `threads`, sets the OpenMP/BLAS thread counts.

    Call before importing the engine: the thread variables are read at import time.
    """
    with open(path) as f:
        request: Request = json.load(f)
    if request.get("mode") not in ("check", "bench"):
        raise ValueError(f"request mode must be 'check' or 'bench', got {request.get('mode')!r}")
    if request.get("threads"):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(int(request["threads"]))
    if request["mode"] == "check":
        lengths = {len(p) for p in request["prompts"]}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"check prompts must be non-empty and of one length, got {lengths}")
    return request


def bench_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A deterministic pseudo-random id sequence of length `n` in [0, vocab) (ids >= 16 only,
    which keeps clear of the special tokens at the start of most vocabularies)."""
    return np.random.default_rng(seed).integers(16, vocab, size=n).tolist()


def greedy_loop(first_logits: np.ndarray, step: Callable[[int], np.ndarray], n: int) -> list[int]:
    """Greedy continuation: argmax of `first_logits` [vocab], then `step(token) -> [vocab]` logits
    of the next position, `n` tokens in all (no EOS stop, no penalties)."""
    tokens = [int(np.argmax(first_logits))]
    while len(tokens) < n:
        tokens.append(int(np.argmax(step(tokens[-1]))))
    return tokens


def timed_rounds(
    request: Request,
    reset: Callable[[], None],
    prefill: Callable[[], np.ndarray],
    step: Callable[[int], np.ndarray],
) -> Arrays:
    """Prompt and decode seconds of `warmup` untimed then `repeats` timed rounds: `reset()`,
    `prefill() -> [vocab]` (the prompt's last logits), then `decode_tokens` greedy `step`s."""
    prompt_s, decode_s = [], []
    warmup = int(request.get("warmup", 1))
    for r in range(warmup + int(request.get("repeats", 1))):
        reset()
        t0 = time.perf_counter()
        last = prefill()
        t1 = time.perf_counter()
        greedy_loop(last, step, int(request["decode_tokens"]) + 1)
        t2 = time.perf_counter()
        if r >= warmup:
            prompt_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    return {"prompt_s": np.array(prompt_s), "decode_s": np.array(decode_s)}


def save(path: str, arrays: Arrays) -> None:
    """Writes the result arrays (uncompressed npz)."""
    np.savez(path, **arrays)
