"""Masked perplexity scoring on SmolLM2: our Scorer vs a transformers (torch) evaluate_ppl loop.

python bench/scoring.py [--rows=2] [--seqlen=1024] [--iters=3]

Both score the same WikiText-2 windows with the reference protocol in one process (timed runs
interleaved). Ours is scored with a candidate mask (one MLP channel group of a middle layer off),
the way the search calls it; torch runs the dense model (it has no masks; same FLOPs). Also
prints our achieved matmul FLOP/s against this machine's measured peak (a large ``jnp.dot``).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from models import masks as masks_lib
from models.spec import ModelSpec
from multipruner_jax.evals.evaluation import eval_ignore_id
from multipruner_jax.runtime.scoring import Scorer
from multipruner_jax.storage import assets, data, hf_io

_ROWS = flags.DEFINE_integer("rows", 2, "Evaluation rows.")
_SEQLEN = flags.DEFINE_integer("seqlen", 1024, "Tokens per row.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed iterations per side.")


def forward_flops(spec: ModelSpec, seq: int) -> float:
    """Matmul FLOPs of one forward of one row of ``seq`` tokens (attention as computed: full)."""
    d, hd = spec.hidden_size, spec.head_dim
    per_token = 2 * spec.hidden_size * spec.vocab_size
    for layer in spec.layers:
        q = layer.kv_groups * spec.q_per_kv * hd
        kv = layer.kv_groups * hd
        if layer.has_attn:
            per_token += 2 * d * (2 * q + 2 * kv) + 2 * 2 * seq * q
        if layer.has_mlp:
            per_token += 2 * 3 * d * layer.mlp_width
    return per_token * seq


def matmul_peak(n: int = 4096) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` (best of 5)."""
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = min(_timed(lambda: dot(a, a).block_until_ready()) for _ in range(5))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_ppl(model, rows: np.ndarray, ignore_id: int) -> float:
    """The reference's evaluate_ppl: per-row mean NLL (ignoring ``ignore_id``), mean, exp."""
    loss = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=ignore_id)
    means = []
    with torch.inference_mode():
        for row in rows:
            ids = torch.from_numpy(row[None]).long()
            logits = model(ids).logits[:, :-1]
            targets = ids[:, 1:]
            nll = loss(logits.permute(0, 2, 1), targets).float()
            counted = targets != ignore_id
            means.append((nll * counted).sum(1) / counted.sum(1))
    return float(torch.exp(torch.cat(means).mean()))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    path = str(assets.smollm2_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = data.evaluation_windows("wikitext2", tokenizer, seqlen=_SEQLEN.value)[: _ROWS.value]
    model = hf_io.load_model(path)
    spec = model.spec
    ignore = eval_ignore_id(spec)
    masks = masks_lib.with_width(masks_lib.ones(spec), "channels", spec.num_layers // 2, 1280)
    scorer = Scorer(rows, ignore_id=ignore, batch_size=1)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch_model.eval()
    start = time.perf_counter()
    ours = scorer.perplexity(model, masks)
    first = time.perf_counter() - start
    theirs_dense = torch_ppl(torch_model, rows, ignore)
    ours_dense = scorer.perplexity(model)
    jax_s, torch_s = [], []
    for _ in range(_ITERS.value):
        jax_s.append(_timed(lambda: scorer.perplexity(model, masks)))
        torch_s.append(_timed(lambda: torch_ppl(torch_model, rows, ignore)))
    tokens = rows.size
    jax_med, torch_med = statistics.median(jax_s), statistics.median(torch_s)
    flops = forward_flops(spec, _SEQLEN.value) * rows.shape[0]
    peak = matmul_peak()
    print(
        f"SmolLM2-135M fp32, {rows.shape[0]} x {_SEQLEN.value} WikiText-2 tokens, "
        f"median of {_ITERS.value}, torch {torch.get_num_threads()} threads"
    )
    print(f"dense perplexity: ours {ours_dense:.4f}, torch {theirs_dense:.4f}; masked: {ours:.4f}")
    print(f"first call (compile + run): {first:.2f} s")
    print(f"ours  {tokens / jax_med:8.0f} tok/s ({jax_med:.2f} s)")
    print(f"torch {tokens / torch_med:8.0f} tok/s ({torch_med:.2f} s)")
    print(f"ratio ours/torch: {torch_med / jax_med:.2f}x")
    print(
        f"achieved {flops / jax_med / 1e9:.1f} GFLOP/s = {flops / jax_med / peak:.0%} of the "
        f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    app.run(main)
