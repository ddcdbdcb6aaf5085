"""The picture of a prune run (``scripts/report.py``, and ``prune.py`` at the end): what each
layer kept, and how the search got there.

A run folder is what ``prune.py`` writes: ``pruning_config.json`` (what was removed) and the dense
model's shapes, read from ``checkpoint/spec.json`` or else from the model that ``flags.txt``
names; ``log.json`` (the search's steps and refine moves) is drawn when present. Everything is
read from these small files, never from weights.

One run draws two panels: per layer, the attention block (bar height: kept heads over the dense
heads, the count written on it; a cross where the block is removed) and the MLP block (kept width
over the dense width), each inside the dense model's outline; and the trajectory, calibration
perplexity against the percent of parameters removed, one colour per stage, dashed lines where a
stage ends, refine moves as stars (they are scored on every calibration row, so their level is
not the stages' own). Several runs draw one layer panel per run and one shared trajectory, for
comparing, say, block-only, greedy and refined results of one model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from models.spec import ModelSpec, dense_spec
from multipruner_jax.storage import checkpoint, hf_io, pruning_config

STAGE_COLOURS = {
    "block": "tab:blue",
    "mlp_width": "tab:green",
    "attn_head": "tab:purple",
    "refine": "tab:red",
}


@dataclass
class Run:
    """What one run folder tells: its name, dense and pruned shapes, and its log records."""

    name: str
    dense: ModelSpec
    pruned: ModelSpec
    steps: list[dict[str, Any]] = field(default_factory=list)


def load_run(path: str) -> Run:
    """Read the run folder ``path``; ``ValueError`` in one sentence when it is not one."""
    config_path = os.path.join(path, pruning_config.FILE)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"--run={path} is not a prune run folder (it has no {pruning_config.FILE}); pass the "
            "--output_path of a prune.py run"
        )
    dense = _dense_spec(path)
    pruned = pruning_config.to_spec(dense, pruning_config.load(config_path))
    log_path = os.path.join(path, "log.json")
    steps = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            steps = json.load(f)["steps"]
    name = os.path.basename(os.path.normpath(path)) or path
    return Run(name, dense, pruned, steps)


def _dense_spec(path: str) -> ModelSpec:
    spec_path = os.path.join(path, checkpoint.DIR, "spec.json")
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            return dense_spec(ModelSpec.from_json(f.read()))
    model_path = _flag(os.path.join(path, "flags.txt"), "model_path")
    if model_path and os.path.isdir(model_path):
        return hf_io.read_dense_spec(model_path)
    raise ValueError(
        f"--run={path}: the dense model's shapes are unknown (no {checkpoint.DIR}/spec.json, and "
        f"flags.txt names no model folder here: --model_path={model_path})"
    )


def _flag(flags_path: str, name: str) -> str | None:
    if not os.path.isfile(flags_path):
        return None
    with open(flags_path) as f:
        for line in f:
            if line.startswith(f"--{name}="):
                return line.strip().split("=", 1)[1]
    return None


def draw(runs: list[Run], out: str) -> list[str]:
    """Draw ``runs`` into ``out.svg`` and ``out.png``; returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(runs)
    fig, axes = plt.subplots(
        n + 1, 1, figsize=(11, 2.6 * n + 3.4), gridspec_kw={"height_ratios": [1] * n + [1.3]}
    )
    for ax, run in zip(axes[:-1], runs, strict=True):
        _layers(ax, run)
    _trajectory(axes[-1], runs)
    fig.tight_layout()
    paths = [f"{out}.svg", f"{out}.png"]
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    plt.close(fig)
    return paths


def _layers(ax, run: Run) -> None:
    """Per layer: attention (kept heads) and MLP (kept width) as shares of the dense layer."""
    dense, pruned = run.dense, run.pruned
    width = 0.38
    for i, (now, full) in enumerate(zip(pruned.layers, dense.layers, strict=True)):
        for offset, kept, share, colour in (
            (-width / 2, now.has_attn, now.kv_groups / full.kv_groups, "tab:orange"),
            (width / 2, now.has_mlp, now.mlp_width / full.mlp_width, "tab:cyan"),
        ):
            x = i + offset
            ax.bar(x, 1.0, width, fill=False, edgecolor="0.6", linewidth=0.8)
            if kept:
                ax.bar(x, share, width, color=colour)
            else:
                ax.plot([x], [0.5], marker="x", color="0.3", markersize=6)
        if now.has_attn:
            heads = now.kv_groups * pruned.q_per_kv
            ax.text(i - width / 2, 1.02, str(heads), ha="center", va="bottom", fontsize=6)
    ratio = 100.0 * (1 - _params(pruned) / _params(dense))
    ax.set_title(
        f"{run.name}: {ratio:.2f}% of parameters removed (orange: attention, number = kept "
        "heads; cyan: MLP width; outline: dense; x: block removed)",
        fontsize=9,
    )
    ax.set_xlim(-0.7, dense.num_layers - 0.3)
    ax.set_ylim(0, 1.15)
    ax.set_xticks(range(dense.num_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("kept / dense")


def _params(spec: ModelSpec) -> int:
    from models.spec import count_params

    return count_params(spec)


def _trajectory(ax, runs: list[Run]) -> None:
    """Calibration perplexity against the ratio removed, stage boundaries, refine moves."""
    markers = "os^dvP"
    drawn = False
    for n, run in enumerate(runs):
        greedy = [s for s in run.steps if s.get("stage") != "refine"]
        moves = [s for s in run.steps if s.get("stage") == "refine"]
        label = run.name if len(runs) > 1 else "greedy steps"
        if greedy:
            xs = [s["ratio"] for s in greedy]
            ys = [s["importance"] for s in greedy]
            ax.plot(xs, ys, color="0.6", linewidth=0.8, zorder=1)
            colours = [STAGE_COLOURS.get(s["stage"], "k") for s in greedy]
            ax.scatter(xs, ys, c=colours, marker=markers[n % len(markers)], s=18, label=label)
            for a, b in zip(greedy, greedy[1:], strict=False):
                if a["stage"] != b["stage"]:
                    ax.axvline(a["ratio"], color=STAGE_COLOURS[a["stage"]], linestyle="--", lw=0.7)
            drawn = True
        if moves:
            xs = [s["ratio"] for s in moves]
            ys = [s["importance"] for s in moves]
            ax.plot([xs[0]], [moves[0]["before"]], marker="o", color=STAGE_COLOURS["refine"], ms=4)
            ax.plot(
                xs,
                ys,
                marker="*",
                color=STAGE_COLOURS["refine"],
                linestyle=":",
                label=f"{run.name}: refine moves (every calibration row)",
            )
            drawn = True
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("calibration perplexity")
    ax.set_title(
        "search trajectory (blue: blocks, green: MLP channels, purple: heads, dashed: a stage "
        "ends, red: refine)",
        fontsize=9,
    )
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(
            0.5, 0.5, "no search log (a config was applied)", ha="center", transform=ax.transAxes
        )
