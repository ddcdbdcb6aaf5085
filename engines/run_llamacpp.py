"""Runs a GGUF model in llama.cpp (llama-cpp-python 0.3.36) on token ids; run with .venv-engines.

    .venv-engines/bin/python engines/run_llamacpp.py --model M.gguf --request R.json --out O.npz

Request options (see runner_common for the common ones):

* `kv_type`: KV cache type, "f32" (default; f16 costs ~0.03 in logits) or "f16".
* `flash_attn`: bool, default false (with it the V cache is not padded to the widest layer).
* `threads`: llama.cpp threads for prompt and decode (default: llama-cpp-python's, all CPUs for
  the prompt, half of them for decode).
* `n_ctx`: context (KV cells) to allocate; default just enough for the request.
* `n_batch`: prompt batch size, default 512 (longer prompts go in several batches).
* `texts` (check): strings to tokenize with the file's vocabulary (no BOS), returned as
  `text_tokens_<i>` int32 arrays.

Output npz:

* check: `logits` float32 [prompts, T, vocab] (every prompt position), `greedy` int32
  [prompts, greedy_tokens] (argmax continuation, EOS ignored).
* bench: `prompt_s`, `decode_s` float64 [repeats] (seconds for `prompt_tokens` tokens in one
  eval; for `decode_tokens` one-token greedy steps), `n_ctx` int.
* both: `kv_cache_mib`, `kv_k_mib`, `kv_v_mib` float (NaN when llama.cpp's log line was not
  found), parsed from llama.cpp's "size = ... MiB (... cells ...), K (f32): ..., V ..." line.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys

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

KV_LINE = re.compile(
    r"size = +([\d.]+) MiB \(.*cells.*\), K \(\w+\): +([\d.]+) MiB, V \(\w+\): +([\d.]+) MiB"
)


def load(model: str, request: Request, n_ctx: int, logits_all: bool) -> tuple[object, Arrays]:
    """Builds the Llama object; returns it and the KV cache sizes read from llama.cpp's log."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[
        request.get("kv_type", "f32")
    ]
    threads = request.get("threads")
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):  # verbose=True is the only way to get the KV line
            llm = llama_cpp.Llama(
                model_path=model,
                n_ctx=int(request.get("n_ctx", n_ctx)),
                n_batch=int(request.get("n_batch", 512)),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                type_k=kv_type,
                type_v=kv_type,
                flash_attn=bool(request.get("flash_attn", False)),
                seed=0,
                verbose=True,
            )
    except Exception:
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    set_verbose(False)  # quiet from here on
    match = KV_LINE.search(log.getvalue())
    sizes = [float(x) for x in match.groups()] if match else [float("nan")] * 3
    names = ("kv_cache_mib", "kv_k_mib", "kv_v_mib")
    return llm, {k: np.float64(v) for k, v in zip(names, sizes, strict=True)}


def check(model: str, request: Request) -> Arrays:
    """All prompt positions' logits plus a greedy continuation, one prompt at a time."""
    prompts: list[list[int]] = request["prompts"]
    n_greedy = int(request.get("greedy_tokens", 16))
    llm, kv = load(model, request, len(prompts[0]) + n_greedy, logits_all=True)
    logits, greedy = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        logits.append(np.array(llm.scores[: len(prompt)], dtype=np.float32))

        def step(token: int) -> np.ndarray:
            llm.eval([token])
            return llm.scores[llm.n_tokens - 1]

        greedy.append(greedy_loop(logits[-1][-1], step, n_greedy))
    texts = {
        f"text_tokens_{i}": np.array(llm.tokenize(text.encode(), add_bos=False), np.int32)
        for i, text in enumerate(request.get("texts", []))
    }
    return {"logits": np.stack(logits), "greedy": np.array(greedy, np.int32), **kv, **texts}


def bench(model: str, request: Request) -> Arrays:
    """Prompt time (one eval of `prompt_tokens`) and greedy decode time, `repeats` times."""
    import llama_cpp

    n_prompt, n_decode = int(request["prompt_tokens"]), int(request["decode_tokens"])
    n_ctx = n_prompt + n_decode + 1
    llm, kv = load(model, request, n_ctx, logits_all=False)
    prompt = bench_ids(n_prompt, llm.n_vocab(), int(request.get("seed", 0)))

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        )

    def step(token: int) -> np.ndarray:
        llm.eval([token])
        return last_logits()

    def prefill() -> np.ndarray:
        llm.eval(prompt)
        return last_logits()

    return {
        **timed_rounds(request, llm.reset, prefill, step),
        "n_ctx": np.int64(llm.n_ctx()),
        **kv,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    request = load_request(args.request)
    run = check if request["mode"] == "check" else bench
    save(args.out, run(args.model, request))


if __name__ == "__main__":
    main()
