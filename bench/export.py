"""Is the pruned compact export smaller and faster in torch? SmolLM2 dense vs pruned, CPU.

python bench/export.py --checkpoints=out/mp10/checkpoint,out/mp20/checkpoint \
    [--pruning_configs=tests/data/smollm2_demo_pruning_config.json] [--iters=5] [--threads=1]

On a CPU shared with other jobs, ``--threads=1`` keeps torch's worker threads from waiting on
busy cores (two threads on two loaded cores made a 1x64 forward 30x slower here).

Models: the dense SmolLM2-135M directory in stock ``LlamaForCausalLM`` (the reference), the same
dense weights exported compact (our modeling file with every layer whole: the cost of our class
alone), and each pruned model (a prune.py checkpoint, or the dense model reordered and cut by a
``pruning_config.json``) exported compact in fp32 and loaded by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

Measured per model: torch CPU latency of a 1x512 forward and of greedy generation of 64 new
tokens after a 32-token prompt with the KV cache (medians; iterations interleaved over the models
so that load from other processes hits all alike), peak resident memory of a fresh process that
loads the model and runs the 1x512 forward (above that process's baseline after imports), and
weight bytes on disk. Each is printed as a ratio to the dense reference beside the parameter
ratio, and beside the ratio of matmul FLOPs the shapes predict (LM head included, attention
scores at the average causal length), which is what latency can at best follow.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pruned_models
import torch
import transformers
from absl import app, flags

from models.spec import ModelSpec, count_params
from multipruner_jax.exporting import export
from multipruner_jax.storage import assets, checkpoint, hf_io

_CHECKPOINTS = flags.DEFINE_list("checkpoints", [], "Pruned prune.py checkpoints to measure.")
_CONFIGS = flags.DEFINE_list(
    "pruning_configs", [], "pruning_config.json files applied to the dense model and measured."
)
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Dense HF directory; default: SmolLM2 asset.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per model and task.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default).")
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens of the timed forward.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Prompt tokens before generation.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated with the KV cache.")


@dataclass
class Model:
    """One measured model: its HF directory, ``from_pretrained`` options and shapes."""

    name: str
    path: str
    spec: ModelSpec
    remote: bool
    model: transformers.PreTrainedModel | None = None


def _load(path: str, remote: bool) -> transformers.PreTrainedModel:
    kw = {"trust_remote_code": True} if remote else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return model.eval()


def _status_mb(key: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def _peak_rss_mb(path: str, remote: bool, threads: int, tokens: np.ndarray, queue) -> None:
    """In a fresh process: peak RSS growth (MB) while loading ``path`` and running a forward.

    ``VmHWM`` rather than ``ru_maxrss``: Linux carries the latter over from the parent."""
    if threads:
        torch.set_num_threads(threads)
    before = _status_mb("VmRSS")
    model = _load(path, remote)
    with torch.inference_mode():
        model(torch.from_numpy(tokens).long())
    queue.put(_status_mb("VmHWM") - before)


def _peak_memory(m: Model, tokens: np.ndarray) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_peak_rss_mb, args=(m.path, m.remote, _THREADS.value, tokens, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    return result


def _disk_bytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def _shares(parts: dict[str, float]) -> str:
    total = sum(parts.values())
    return ", ".join(f"{name} {value / total:.1%}" for name, value in parts.items())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _models(workdir: str, dense_dir: str) -> list[Model]:
    dense_spec = hf_io.read_spec(dense_dir)
    models = [Model("dense (stock)", dense_dir, dense_spec, remote=False)]
    dense = hf_io.load_model(dense_dir)
    out = os.path.join(workdir, "dense")
    export.export(dense, out)
    models.append(Model("dense (ours)", out, dense_spec, remote=True))
    for path in _CHECKPOINTS.value:
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        out = os.path.join(workdir, name)
        export.export_checkpoint(path, out)
        models.append(Model(name, out, checkpoint.load_spec(path), remote=True))
    for file in _CONFIGS.value:
        pruned, config = pruned_models.from_config(dense_dir, file)
        name = pruned_models.run_name(file)
        out = os.path.join(workdir, name)
        export.export(pruned, out, config=config)
        models.append(Model(name, out, pruned.spec, remote=True))
    return models


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    dense_dir = _MODEL_DIR.value or str(assets.smollm2_dir())
    vocab = hf_io.read_spec(dense_dir).vocab_size
    rng = np.random.default_rng(0)
    forward_tokens = rng.integers(0, vocab, (1, _SEQ.value), dtype=np.int64)
    prompt = torch.from_numpy(rng.integers(0, vocab, (1, _PROMPT.value), dtype=np.int64))
    with tempfile.TemporaryDirectory() as workdir:
        models = _models(workdir, dense_dir)
        memory = {m.name: _peak_memory(m, forward_tokens) for m in models}
        for m in models:
            m.model = _load(m.path, m.remote)
        forward_s: dict[str, list[float]] = {m.name: [] for m in models}
        generate_s: dict[str, list[float]] = {m.name: [] for m in models}
        x = torch.from_numpy(forward_tokens)
        for i in range(_ITERS.value + 1):  # the first round warms up and is not counted
            for m in models:
                with torch.inference_mode():
                    f = _timed(lambda m=m: m.model(x))
                    g = _timed(
                        lambda m=m: m.model.generate(
                            prompt,
                            max_new_tokens=_NEW.value,
                            min_new_tokens=_NEW.value,
                            do_sample=False,
                        )
                    )
                if i:
                    forward_s[m.name].append(f)
                    generate_s[m.name].append(g)
        disk = {m.name: _disk_bytes(m.path) for m in models}
    print(
        f"{os.path.basename(dense_dir)} fp32 | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} | median of {_ITERS.value} | forward 1x{_SEQ.value}, "
        f"generate {_NEW.value} tokens after {_PROMPT.value} (KV cache, greedy)"
    )
    print(f"{'model':>16} {'params':>12} {'fwd s':>7} {'gen s':>7} {'peak MB':>8} {'disk MB':>8}")
    for m in models:
        print(
            f"{m.name:>16} {m.model.num_parameters():>12,} "
            f"{statistics.median(forward_s[m.name]):>7.3f} "
            f"{statistics.median(generate_s[m.name]):>7.3f} {memory[m.name]:>8.0f} "
            f"{disk[m.name] / 1e6:>8.1f}"
        )
    ref = models[0]
    # A forward's queries see (seq + 1) / 2 keys on average; decode steps prompt + new / 2.
    keys = {"fwd": (_SEQ.value + 1) / 2, "tok": _PROMPT.value + _NEW.value / 2}
    ref_flops = {task: sum(pruned_models.flops(ref.spec, n).values()) for task, n in keys.items()}
    print(f"ratios to {ref.name} (FLOPs: matmul FLOPs the shapes predict, per token):")
    print(
        f"{'model':>16} {'params':>7} {'FLOPs fwd':>9} {'fwd':>6} {'FLOPs tok':>9} {'gen':>6} "
        f"{'peak':>6} {'disk':>6}"
    )
    for m in models[1:]:
        flops = {
            task: sum(pruned_models.flops(m.spec, n).values()) / ref_flops[task]
            for task, n in keys.items()
        }
        params = m.model.num_parameters() / ref.model.num_parameters()
        fwd = statistics.median(forward_s[m.name]) / statistics.median(forward_s[ref.name])
        gen = statistics.median(generate_s[m.name]) / statistics.median(generate_s[ref.name])
        print(
            f"{m.name:>16} {params:>7.3f} {flops['fwd']:>9.3f} {fwd:>6.3f} {flops['tok']:>9.3f} "
            f"{gen:>6.3f} {memory[m.name] / memory[ref.name]:>6.3f} "
            f"{disk[m.name] / disk[ref.name]:>6.3f}"
        )
    spec = ref.spec
    print(f"dense FLOPs, forward 1x{_SEQ.value}: {_shares(pruned_models.flops(spec, keys['fwd']))}")
    print(f"dense FLOPs, decode step: {_shares(pruned_models.flops(spec, keys['tok']))}")
    share = spec.vocab_size * spec.hidden_size / count_params(spec)
    print(f"embedding matrix (also the LM head when tied): {share:.1%} of the dense parameters")


if __name__ == "__main__":
    app.run(main)
