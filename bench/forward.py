"""Forward throughput: our jitted fp32 ``CausalLM`` vs transformers (torch) on the same weights.

python bench/forward.py [--model_dir=.assets/smollm2-135m] [--iters=5]

Both run the SmolLM2-135M assets directory on the same random tokens, in one process, with timed
iterations interleaved (one JAX, one torch, ...) so that load from other processes hits both
alike. JAX compile time is measured separately and excluded; each timed JAX call ends with
``block_until_ready``. Prints tokens/s (median over iterations), the ratio JAX / torch, and the
max |logit| difference as a sanity check: random tokens drive SmolLM2 into residual activations
of ~2e4, so fp32 rounding alone gives differences of ~1e-2 at 2048 tokens (transformers' own
fp32 run differs from its fp64 run by ~5e-3 there).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags
from flax import nnx

from multipruner_jax.storage import assets, hf_io

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "HF directory; default: the SmolLM2 asset.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations per framework and shape.")
_SHAPES = flags.DEFINE_list("shapes", ["1x2048", "4x512"], "Batch x sequence shapes to time.")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_shape(jax_forward, state, torch_model, batch: int, seq: int) -> dict:
    """Compile, check agreement, then time both frameworks on ``int32[batch, seq]`` tokens."""
    vocab = torch_model.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
    jax_tokens, torch_tokens = jnp.asarray(tokens), torch.from_numpy(tokens).long()
    start = time.perf_counter()
    compiled = jax_forward.lower(state, jax_tokens).compile()
    compile_s = time.perf_counter() - start

    def run_jax() -> jax.Array:
        return compiled(state, jax_tokens).block_until_ready()

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return torch_model(torch_tokens).logits

    max_diff = float(np.abs(np.asarray(run_jax()) - run_torch().numpy()).max())
    jax_s, torch_s = [], []
    for _ in range(_ITERS.value):
        jax_s.append(_timed(run_jax))
        torch_s.append(_timed(run_torch))
    n = batch * seq
    return {
        "shape": f"{batch}x{seq}",
        "compile_s": compile_s,
        "jax_tok_s": n / statistics.median(jax_s),
        "torch_tok_s": n / statistics.median(torch_s),
        "max_diff": max_diff,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jax.config.update("jax_default_matmul_precision", "highest")
    model_dir = _MODEL_DIR.value or str(assets.smollm2_dir())
    graphdef, state = nnx.split(hf_io.load_model(model_dir, jnp.float32))
    jax_forward = jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch_model.eval()
    print(
        f"model {model_dir} | fp32 | jax {jax.__version__} on {jax.devices()[0].platform} "
        f"| torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"attn={torch_model.config._attn_implementation}) | {os.cpu_count()} CPUs "
        f"| median of {_ITERS.value}"
    )
    header = (
        f"{'shape':>8} {'compile s':>10} {'JAX tok/s':>10} {'torch tok/s':>12} {'JAX/torch':>10}"
    )
    print(header + f" {'max|dlogit|':>12}")
    for shape in _SHAPES.value:
        batch, seq = (int(x) for x in shape.split("x"))
        r = _bench_shape(jax_forward, state, torch_model, batch, seq)
        print(
            f"{r['shape']:>8} {r['compile_s']:>10.2f} {r['jax_tok_s']:>10.0f} "
            f"{r['torch_tok_s']:>12.0f} {r['jax_tok_s'] / r['torch_tok_s']:>10.2f} "
            f"{r['max_diff']:>12.2e}"
        )


if __name__ == "__main__":
    app.run(main)
