"""Projection (not a measurement): a Llama-2-7B 22 % search on a TPU v5e-8 and on 8 H100s.

python bench/projection.py [--utilisation=0.4]

Evaluations per stage are the reference's (§4 of the reference notes: 10 block steps, 595
evaluations on the block set; 55 MLP steps, 1,705 evaluations; 23 head steps, 529 evaluations on
the width set); rows per set are the notes' estimates for 256 / 128 Alpaca records at 2048
tokens. FLOPs come from ``bench/cost.py`` on the dense Llama-2-7B shapes (an upper bound:
the model shrinks by 22 % along the way). Every chip is assumed to reach ``--utilisation`` of its
dense bf16 peak; the reference (``device_map="auto"`` runs its layers one GPU at a time) is
projected on one H100 at the same utilisation.
"""

from __future__ import annotations

import cost
from absl import app, flags

from models.spec import spec_from_hf_config

# The shape fields of Llama-2-7B's config.json (the same as tests/llama2_7b.py, whose parameter
# count the tests check against the paper's).
LLAMA2_7B_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}

_UTIL = flags.DEFINE_float("utilisation", 0.4, "Assumed share of the bf16 peak reached.")
_BLOCK_ROWS = flags.DEFINE_integer("block_rows", 17, "2048-token rows of the block set.")
_WIDTH_ROWS = flags.DEFINE_integer("width_rows", 8, "2048-token rows of the width set.")

# name: (chips, candidate groups, bf16 peak FLOP/s per chip, mesh and why)
MACHINES = {
    "TPU v5e-8": (
        8,
        2,
        197e12,
        "mesh 2,2,2: 16 GB per chip holds half the bf16 weights (6.7 GB) plus half the "
        "prefix cache (4.6 GB), so a candidate group needs 4 chips",
    ),
    "8x H100 SXM": (
        8,
        8,
        989e12,
        "mesh 8,1,1: 80 GB holds the weights (13.5 GB) and the whole prefix cache (9.1 GB)",
    ),
}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    spec = spec_from_hf_config(LLAMA2_7B_CONFIG)
    stages = [
        cost.StageWork("block", steps=10, evaluations=595, rows=_BLOCK_ROWS.value),
        cost.StageWork("mlp_width", steps=55, evaluations=1705, rows=_WIDTH_ROWS.value),
        cost.StageWork("attn_head", steps=23, evaluations=529, rows=_WIDTH_ROWS.value),
    ]
    util = _UTIL.value
    print(
        f"PROJECTION, not a measurement: Llama-2-7B at 22 % (2,829 evaluations), seq 2048, "
        f"{_BLOCK_ROWS.value} block / {_WIDTH_ROWS.value} width rows, bf16, "
        f"{util:.0%} of peak assumed"
    )
    for name, (chips, groups, peak, why) in MACHINES.items():
        p = cost.project(
            spec, stages, 2048, chips=chips, candidate_groups=groups, peak=peak, utilisation=util
        )
        print(
            f"{name}: ours {cost.rough_duration(p.seconds)} "
            f"({p.engine_flops / 1e15:,.0f} PFLOP executed, "
            f"{p.engine_flops / p.reference_flops:.0%} of the reference loop's; chips busy "
            f"{p.busy:.0%} of the time, the rest waiting in lock step); {why}"
        )
    print(
        f"reference loop (a full forward per candidate): {p.reference_flops / 1e15:,.0f} PFLOP, "
        f"{cost.rough_duration(p.reference_seconds)} on one H100 at the same utilisation"
    )


if __name__ == "__main__":
    app.run(main)
