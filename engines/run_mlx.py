"""Runs an HF-style model directory in mlx-lm 0.32.2 (Linux CPU backend) on token ids; run with
.venv-engines.

    .venv-engines/bin/python engines/run_mlx.py --model DIR --request R.json --out O.npz

`mlx_lm.load(DIR)` reads config.json and the safetensors directly (Llama, DeciLM/nemotron-nas,
...; no remote code). The forward is `model(mx.array[1, T], cache=prompt_cache)` -> [1, T, vocab].
`threads` only sets OMP/BLAS variables; mlx has no thread-count setting of its own.

Pitfall: mlx-lm reads only the legacy top-level `rope_theta` (default 10000 for Llama, 500000 for
nemotron-nas) and `rope_scaling`, not transformers 5's `rope_parameters`, and is silently wrong
without them. The runner therefore refuses a config.json that lacks them unless the request
passes `config_overrides` (given to `mlx_lm.load(model_config=...)`), e.g.
`{"rope_theta": 100000.0}`.

Output npz:

* check: `logits` float32 [prompts, T, vocab] (every prompt position, one forward per prompt),
  `greedy` int32 [prompts, greedy_tokens] (argmax continuation with the KV cache, EOS ignored).
* bench: `prompt_s`, `decode_s` float64 [repeats] (seconds for one forward of `prompt_tokens`
  tokens with a fresh cache; for `decode_tokens` one-token greedy steps), `load_s` float.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from runner_common import (
    Arrays,
    Request,
    bench_ids,
    greedy_loop,
    load_request,
    parse_args,
    save,
    timed_rounds,
)


class Runner:
    """The loaded model plus a KV-cached forward."""

    def __init__(self, model_dir: str, overrides: dict | None = None) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.models.cache import make_prompt_cache

        config = json.loads((Path(model_dir) / "config.json").read_text())
        overrides = overrides or {}
        if "rope_theta" not in config and "rope_theta" not in overrides:
            raise ValueError(
                f"{model_dir}/config.json has no top-level rope_theta (rope_parameters: "
                f"{config.get('rope_parameters')}); mlx-lm would use its default. Write the "
                "legacy key or pass config_overrides={'rope_theta': ...} in the request."
            )
        rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
        if rope_type != "default" and "rope_scaling" not in {**config, **overrides}:
            raise ValueError(
                f"{model_dir}/config.json has rope_type {rope_type!r} but no legacy rope_scaling, "
                "which is what mlx-lm reads. Write it or pass it in config_overrides."
            )
        t0 = time.perf_counter()
        # The tokenizer loader reads config.json through transformers; a DeciLM config with llama3
        # rope needs our config class for that (the generic fallback fails on it), hence
        # trust_remote_code, as `mlx_lm.generate --trust-remote-code` gives it.
        self.model, _ = load(
            model_dir, model_config=overrides, tokenizer_config={"trust_remote_code": True}
        )
        self.load_s = time.perf_counter() - t0
        self.mx, self.make_cache = mx, make_prompt_cache
        self.cache: list = []

    def reset(self) -> None:
        """Starts a new sequence (fresh KV cache)."""
        self.cache = self.make_cache(self.model)

    def forward(self, ids: list[int], last_only: bool = False) -> np.ndarray:
        """Appends `ids` to the sequence; returns their logits, float32 [len(ids), vocab]
        (or [1, vocab], the last position's, with `last_only`)."""
        mx = self.mx
        logits = self.model(mx.array([ids]), cache=self.cache)[0]
        return np.array((logits[-1:] if last_only else logits).astype(mx.float32))

    def vocab_size(self) -> int:
        """Vocabulary size of the output head (one forward of one token)."""
        self.reset()
        return self.forward([0]).shape[-1]


def check(runner: Runner, request: Request) -> Arrays:
    """All prompt positions' logits plus a greedy continuation, one prompt at a time."""
    n_greedy = int(request.get("greedy_tokens", 16))
    logits, greedy = [], []
    for prompt in request["prompts"]:
        runner.reset()
        logits.append(runner.forward(prompt))
        greedy.append(greedy_loop(logits[-1][-1], lambda t: runner.forward([t])[-1], n_greedy))
    return {"logits": np.stack(logits), "greedy": np.array(greedy, np.int32)}


def bench(runner: Runner, request: Request) -> Arrays:
    """Prompt time (one forward of `prompt_tokens`) and greedy decode time, `repeats` times."""
    n_prompt = int(request["prompt_tokens"])
    prompt = bench_ids(n_prompt, runner.vocab_size(), int(request.get("seed", 0)))
    return {
        **timed_rounds(
            request,
            runner.reset,
            lambda: runner.forward(prompt, last_only=True)[-1],
            lambda t: runner.forward([t])[-1],
        ),
        "load_s": np.float64(runner.load_s),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    request = load_request(args.request)
    runner = Runner(args.model, request.get("config_overrides"))
    save(args.out, (check if request["mode"] == "check" else bench)(runner, request))


if __name__ == "__main__":
    main()
