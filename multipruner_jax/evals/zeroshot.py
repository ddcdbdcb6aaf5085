"""Zero-shot accuracy through lm-evaluation-harness, and the paper's table row.

The paper (MultiPruner, §3.1 of the reference notes) reports WikiText-2 perplexity and five
zero-shot tasks run with lm-eval at ``num_fewshot=0``: ``acc_norm`` for PIQA, HellaSwag, ARC-e and
ARC-c, ``acc`` for WinoGrande (generally: ``acc_norm`` where a task has it, else ``acc``), and the
unweighted mean of those five numbers.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import TextIO

from multipruner_jax.base.console import StatusLine, clock
from multipruner_jax.evals.task_data import LoadedTasks


def lm_eval_version() -> str:
    return importlib.metadata.version("lm-eval")


def paper_metric(metrics: dict) -> str:
    """``acc_norm`` when lm-eval reported it for the task, else ``acc``."""
    return "acc_norm" if "acc_norm,none" in metrics else "acc"


def run(lm, loaded: LoadedTasks, *, limit: int | None = None, num_fewshot: int = 0) -> dict:
    """Evaluate ``lm`` (an lm-eval ``LM``) on ``loaded``'s tasks with lm-eval's
    ``simple_evaluate``; ``limit``: the first N documents of each task (``None``: all).

    Returns ``{"tasks": {name: {metric, value, stderr, metrics, version, evaluated, data}},
    "mean": float}`` in the order of ``loaded.tasks``.
    """
    import lm_eval

    names = list(loaded.tasks)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[loaded.tasks[n] for n in names],
        task_manager=loaded.manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,
    )
    tasks = {}
    for name in names:
        raw = out["results"][name]
        metric = paper_metric(raw)
        metrics = {
            k.split(",")[0]: _number(v)
            for k, v in raw.items()
            if k.endswith(",none") and _number(v) is not None
        }
        tasks[name] = {
            "metric": metric,
            "value": metrics[metric],
            "stderr": metrics.get(f"{metric}_stderr"),
            "metrics": metrics,
            "version": out["versions"].get(name),
            "evaluated": int(out["n-samples"][name]["effective"]),
            "data": loaded.data[name],
        }
    mean = sum(t["value"] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "mean": mean}


def format_tasks(zeroshot: dict) -> str:
    """One line per task: its metric with stderr, documents evaluated, and where they came from."""
    lines = []
    for name, task in zeroshot["tasks"].items():
        data = task["data"]
        where = (
            f"{data['package']} {data['package_version']} {data['path']}"
            if data["source"] == "local"
            else f"hub {data['dataset']}" + (f"/{data['name']}" if data["name"] else "")
        )
        stderr = f" +- {task['stderr']:.4f}" if task["stderr"] is not None else ""
        lines.append(
            f"{name}: {task['metric']} {task['value']:.4f}{stderr} on {task['evaluated']} of "
            f"{data['docs']} {data['split']} documents ({where})"
        )
    return "\n".join(lines)


def format_row(result: dict) -> str:
    """The paper's row as a two-line table: parameters, WikiText-2 perplexity, each task's
    metric (percent) and their mean."""
    dataset = result.get("dataset", "wikitext2")
    label = dataset if dataset == "wikitext2" else f"ppl {_tail(dataset, 20)}"
    width = max(9, len(label))
    head = [f"{'model':<30}", f"{'params':>13}", f"{label:>{width}}"]
    values = [f"{_tail(result['model'], 30):<30}", f"{result['params']:>13,}"]
    values.append(f"{result['perplexity']:>{width}.2f}")
    zeroshot = result.get("zeroshot")
    if zeroshot:
        for name, task in zeroshot["tasks"].items():
            label = f"{name} {task['metric']}"
            head.append(label)
            values.append(f"{100 * task['value']:>{len(label)}.2f}")
        head.append(f"{'mean':>6}")
        values.append(f"{100 * zeroshot['mean']:>6.2f}")
    return "  ".join(head) + "\n" + "  ".join(values)


class ProgressLine:
    """``progress(done, total, seconds)`` for the scorer: requests done, rate and ETA; rewritten
    in place on a terminal, elsewhere printed at most every ``every`` seconds and at the end."""

    def __init__(self, stream: TextIO = sys.stderr, every: float = 10.0):
        self.status = StatusLine(stream, every)

    def __call__(self, done: int, total: int, seconds: float) -> None:
        rate = done / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = f"zero-shot: {done}/{total} requests, {rate:.1f} req/s, ETA {clock(eta)}"
        self.status.show(line, final=done == total)


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _tail(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
