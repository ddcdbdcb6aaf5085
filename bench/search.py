"""Wall time of a fixed short search on SmolLM2, with and without prefix caching.

python bench/search.py [--seqlen=256] [--target_ratio=2]

Both runs search the same reordered SmolLM2-135M with the same calibration rows (State of the
Union text) and must take the same decisions. Reports wall time, candidates scored, and the share
of time spent tracing and compiling (summed from jax.monitoring duration events).
"""

from __future__ import annotations

import time
from collections import defaultdict

import jax
import transformers
from absl import app, flags

from multipruner_jax import assets, data, hf_io, search, surgery
from multipruner_jax.scoring import Scorer

_SEQLEN = flags.DEFINE_integer("seqlen", 256, "Calibration row length.")
_TARGET = flags.DEFINE_float("target_ratio", 2.0, "Target ratio of the short search (percent).")
_BLOCK = flags.DEFINE_integer("block_samples", 4, "Block calibration records.")
_WIDTH = flags.DEFINE_integer("width_samples", 2, "Width calibration records.")

_COMPILE_EVENTS = ("backend_compile", "jaxpr_trace", "jaxpr_to_mlir")
_durations: dict[str, float] = defaultdict(float)


def _listen(event: str, duration: float, **_) -> None:
    if any(key in event for key in _COMPILE_EVENTS):
        _durations["compile"] += duration


def _run(model, rows, ignore, prefix_cache: bool):
    settings = search.Settings(
        target_ratio=_TARGET.value,
        distribution=(0.44, 0.52, 0.04),
        mlp_group=256,
        attn_group=192,
        prefix_cache=prefix_cache,
    )
    scorers = {name: Scorer(r, ignore_id=ignore, batch_size=1) for name, r in rows.items()}
    _durations.clear()
    start = time.perf_counter()
    _, state = search.search(model, model.spec, scorers, settings)
    wall = time.perf_counter() - start
    return state, wall, _durations["compile"]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jax.monitoring.register_event_duration_secs_listener(_listen)
    path = str(assets.smollm2_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    width, block = data.calibration_windows(
        str(assets.sotu_dir()),
        tokenizer,
        seqlen=_SEQLEN.value,
        num_width=_WIDTH.value,
        num_block=_BLOCK.value,
    )
    model = hf_io.load_model(path)
    surgery.reorder(model)
    rows = {"block": block, "width": width}
    print(
        f"SmolLM2-135M fp32, target {_TARGET.value}% (44:52:4, groups 256/192), "
        f"{block.shape[0]} block + {width.shape[0]} width rows of {_SEQLEN.value} tokens"
    )
    results = {}
    for prefix_cache in (False, True):
        state, wall, compile_s = _run(model, rows, tokenizer.eos_token_id, prefix_cache)
        results[prefix_cache] = state
        cands = sum(s.candidates for s in state.steps)
        print(
            f"prefix_cache={str(prefix_cache):5}: {wall:7.1f} s wall, {len(state.steps)} steps, "
            f"{cands} candidates, {wall / cands:.3f} s/candidate, compile+trace "
            f"{compile_s:.1f} s ({compile_s / wall:.0%})"
        )
    same = [(s.stage, s.kind, s.layer) for s in results[False].steps] == [
        (s.stage, s.kind, s.layer) for s in results[True].steps
    ]
    print(f"same decisions: {same}")


if __name__ == "__main__":
    app.run(main)
