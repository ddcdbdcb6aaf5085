"""Do pruned models run faster in the serving engines? SmolLM2 dense vs pruned, on this CPU.

python bench/serving.py --pruning_configs=tests/data/smollm2_demo_pruning_config.json,\
out/results/mp20/pruning_config.json [--rounds=5] [--threads=1] [--engines=llamacpp,vllm,mlx]

Needs `make engines`. The dense SmolLM2-135M and each pruned model (the dense model cut by a
``pruning_config.json``, as prune.py builds it) are exported as ``gguf`` (float32 and q8_0) and
``decilm`` (float32); the dense model goes through the same exporters, so both sides run the same
engine code (llama.cpp's ``deci`` graph, vLLM's and mlx-lm's DeciLM model).

Measured, in ``--rounds`` interleaved rounds (every model once per round, so that load from other
processes hits all alike; each run loads the model afresh and has one untimed warm-up), medians:

* llama.cpp: prompt processing of 512 tokens and greedy decoding of 128, f16 KV cache and flash
  attention (as the export's README recommends), ``--threads`` threads; and the KV-cache size at
  4096 tokens of context with and without flash attention;
* vLLM (fp32, eager): requests/s on a fixed batch of 8 prompts of 128 tokens generating 32 each,
  and single-sequence prompt (512) and decode (128) times;
* mlx-lm (fp32): prompt 128 and decode 32 (its CPU wheel uses a reference BLAS, so only ratios
  mean anything there).

Each time is printed as a ratio to dense beside the parameter ratio and the matmul-FLOP ratio
(what time can at best follow: the tied embedding counts as parameters but costs FLOPs only as the
LM head), with file sizes.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass

import pruned_models
from absl import app, flags

from engines import harness
from models.spec import ModelSpec, count_params
from multipruner_jax.exporting import export
from multipruner_jax.storage import assets, hf_io

_CONFIGS = flags.DEFINE_list("pruning_configs", [], "pruning_config.json files to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (medians over them).")
_THREADS = flags.DEFINE_integer("threads", 1, "Engine threads (1 keeps OpenMP spinning off).")
_ENGINES = flags.DEFINE_list("engines", ["llamacpp", "vllm", "mlx"], "Engines to measure.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Keep the exports here (default: a temp dir).")

PROMPT, DECODE = 512, 128
KV_CONTEXT = 4096


@dataclass
class Model:
    name: str
    spec: ModelSpec
    paths: dict[str, str]  # gguf-float32, gguf-q8_0, decilm -> path


def _export(name: str, model, tokenizer: str, workdir: str) -> Model:
    paths = {}
    for fmt, dtype in (("gguf", "float32"), ("gguf", "q8_0"), ("decilm", "float32")):
        out = os.path.join(workdir, f"{name}-{fmt}-{dtype}")
        if not os.path.isdir(out):
            export.export(model, out, fmt=fmt, dtype=dtype, tokenizer=tokenizer)
        paths[f"{fmt}-{dtype}"] = os.path.join(out, "model.gguf") if fmt == "gguf" else out
    return Model(name, model.spec, paths)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )


# Each setting: (engine, export, request, measured keys).
SETTINGS = {
    "llama.cpp f32": (
        "llamacpp",
        "gguf-float32",
        {"prompt_tokens": PROMPT, "decode_tokens": DECODE, "kv_type": "f16", "flash_attn": True},
        ("prompt_s", "decode_s"),
    ),
    "llama.cpp q8_0": (
        "llamacpp",
        "gguf-q8_0",
        {"prompt_tokens": PROMPT, "decode_tokens": DECODE, "kv_type": "f16", "flash_attn": True},
        ("prompt_s", "decode_s"),
    ),
    "vLLM fp32": (
        "vllm",
        "decilm-float32",
        {
            "prompt_tokens": PROMPT,
            "decode_tokens": DECODE,
            "batch": 8,
            "batch_prompt_tokens": 128,
            "batch_decode_tokens": 32,
        },
        ("prompt_s", "decode_s", "batch_s"),
    ),
    "mlx-lm fp32": (
        "mlx",
        "decilm-float32",
        {"prompt_tokens": 128, "decode_tokens": 32},
        ("prompt_s", "decode_s"),
    ),
}


def _kv_sizes(model: Model) -> dict[str, float]:
    """llama.cpp's K and V cache MiB at ``KV_CONTEXT`` tokens, flash attention off and on."""
    sizes = {}
    for flash in (False, True):
        out = harness.run(
            "llamacpp",
            model.paths["gguf-float32"],
            {
                "mode": "check",
                "prompts": [[16, 17]],
                "greedy_tokens": 1,
                "n_ctx": KV_CONTEXT,
                "kv_type": "f16",
                "flash_attn": flash,
            },
        )
        tag = "FA" if flash else "no FA"
        sizes[f"K {tag}"], sizes[f"V {tag}"] = float(out["kv_k_mib"]), float(out["kv_v_mib"])
    return sizes


def _ratios(spec: ModelSpec, dense: ModelSpec, prompt: int, decode: int) -> tuple[float, ...]:
    """Parameter ratio, and matmul-FLOP ratios of the prompt (queries see (n + 1) / 2 keys on
    average) and of a decode step (prompt + decode / 2 keys)."""

    def ratio(keys: float) -> float:
        total = sum(pruned_models.flops(spec, keys).values())
        return total / sum(pruned_models.flops(dense, keys).values())

    params = count_params(spec) / count_params(dense)
    return params, ratio((prompt + 1) / 2), ratio(prompt + decode / 2)


def _row(cells: tuple) -> str:
    widths = (15, 14, 7, 8, 8, 9, 8, 8, 6)
    return " ".join(
        f"{c:>{w}.3f}" if isinstance(c, float) else f"{c:>{w}}"
        for c, w in zip(cells, widths, strict=True)
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = {k: v for k, v in SETTINGS.items() if v[0] in _ENGINES.value}
    for engine in {v[0] for v in settings.values()}:
        reason = harness.unavailable_reason(engine)
        if reason:
            raise app.UsageError(reason)
    dense_dir, tokenizer = str(assets.smollm2_dir()), str(assets.smollm2_dir())
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench-engines-")
    os.makedirs(workdir, exist_ok=True)
    models = [_export("dense", hf_io.load_model(dense_dir), tokenizer, workdir)]
    for file in _CONFIGS.value:
        pruned, _ = pruned_models.from_config(dense_dir, file)
        models.append(_export(pruned_models.run_name(file), pruned, tokenizer, workdir))
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for _ in range(_ROUNDS.value):
        for setting, (engine, fmt, request, keys) in settings.items():
            for m in models:
                req = {
                    "mode": "bench",
                    "repeats": 1,
                    "warmup": 1,
                    "threads": _THREADS.value,
                    **request,
                }
                out = harness.run(engine, m.paths[fmt], req)
                for key in keys:
                    times[setting, m.name, key].append(float(statistics.median(out[key])))
    print(
        f"SmolLM2-135M on {os.cpu_count()} CPUs, {_THREADS.value} thread(s), load average "
        f"{os.getloadavg()[0]:.1f}, median of {_ROUNDS.value} interleaved rounds"
    )
    dense = models[0]
    for m in models:
        print(
            f"{m.name}: {count_params(m.spec):,} parameters; "
            + ", ".join(f"{k} {_size(p) / 1e6:.1f} MB" for k, p in m.paths.items())
        )
    header = ("setting", "model", "params", "FLOPs p", "FLOPs d", "metric", "dense s", "s", "ratio")
    print(_row(header))
    for setting, (_, _, request, keys) in settings.items():
        for m in models[1:]:
            ratios = _ratios(m.spec, dense.spec, request["prompt_tokens"], request["decode_tokens"])
            for key in keys:
                d = statistics.median(times[setting, dense.name, key])
                p = statistics.median(times[setting, m.name, key])
                print(_row((setting, m.name, *ratios, key, d, p, p / d)))
    if "llamacpp" in _ENGINES.value:
        print(f"llama.cpp KV cache at {KV_CONTEXT} tokens (f16, MiB):")
        for m in models:
            print(f"  {m.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in _kv_sizes(m).items()))


if __name__ == "__main__":
    app.run(main)
