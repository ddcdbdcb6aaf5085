"""Zero-shot request throughput: our lm-eval adapter (JAX) vs lm-eval's own ``hf`` model (torch).

python bench/evaluation.py [--model_dir=.assets/smollm2-135m] [--task=piqa] [--docs=100]

Both score the same lm-eval loglikelihood requests (the first ``--docs`` documents of the task,
zero-shot, offline task data) in one process. Our first call (tracing and compiling every
bucket shape, then scoring) is reported on its own; then timed runs alternate (ours, theirs,
...) so that load from other processes hits both alike. Prints requests/s (median), the ratio
ours / hf, the largest log-likelihood difference and whether the greedy flags agree.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from multipruner_jax.base import mesh
from multipruner_jax.evals import task_data
from multipruner_jax.evals.lm_eval_adapter import JaxLM
from multipruner_jax.storage import assets

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "HF directory; default: the SmolLM2 asset.")
_TASK = flags.DEFINE_enum("task", "piqa", list(task_data.PAPER_TASKS), "Task to draw from.")
_DOCS = flags.DEFINE_integer("docs", 100, "Documents of the task (requests: their choices).")
_ITERS = flags.DEFINE_integer("iters", 2, "Timed runs per side.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Requests per batch, both sides.")
_MESH = flags.DEFINE_string("mesh_shape", "", "Our 'data,model' mesh; default all on data.")


def _timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import torch
    from lm_eval.models.huggingface import HFLM

    jax.config.update("jax_default_matmul_precision", "highest")
    model_dir = _MODEL_DIR.value or str(assets.smollm2_dir())
    name = _TASK.value
    task = task_data.load_tasks((name,), "local").tasks[name]
    task.build_all_requests(limit=_DOCS.value, rank=0, world_size=1)
    requests = task.instances
    ours = JaxLM.from_path(
        model_dir,
        mesh_shape=mesh.parse_mesh_shape(_MESH.value, candidates=False),
        batch_size=_BATCH.value,
    )
    theirs = HFLM(pretrained=model_dir, dtype="float32", batch_size=_BATCH.value, device="cpu")
    first_s, first = _timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
    ours_s, theirs_s = [], []
    for _ in range(_ITERS.value):
        seconds, got = _timed(lambda: ours.loglikelihood(requests, disable_tqdm=True))
        ours_s.append(seconds)
        seconds, want = _timed(lambda: theirs.loglikelihood(requests, disable_tqdm=True))
        theirs_s.append(seconds)
    n = len(requests)
    tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in requests)
    diff = np.abs(np.array([g[0] for g in got]) - np.array([w[0] for w in want])).max()
    same_greedy = [g[1] for g in got] == [w[1] for w in want] == [f[1] for f in first]
    ours_rate, theirs_rate = n / statistics.median(ours_s), n / statistics.median(theirs_s)
    shapes = sorted(ours.scorer.shapes)
    print(
        f"{name}: {_DOCS.value} docs, {n} loglikelihood requests, {tokens} tokens; fp32, batch "
        f"{_BATCH.value}, median of {_ITERS.value}; torch {torch.get_num_threads()} threads, "
        f"JAX mesh {dict(ours.scorer.mesh.shape)}"
    )
    print(f"ours first call (trace + compile + score): {first_s:.1f} s, {ours.compiles} compiles")
    print(f"bucket shapes (input, continuation): {shapes}")
    print(f"ours (JaxLM)   {ours_rate:7.2f} requests/s ({statistics.median(ours_s):.1f} s)")
    print(f"lm-eval hf     {theirs_rate:7.2f} requests/s ({statistics.median(theirs_s):.1f} s)")
    print(f"ratio ours/hf: {ours_rate / theirs_rate:.2f}x")
    print(f"max |loglikelihood difference| {diff:.2e}; greedy flags agree: {same_greedy}")


if __name__ == "__main__":
    app.run(main)
