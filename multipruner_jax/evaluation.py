"""Perplexity and zero-shot reports for HF directories and pruned checkpoints."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models.decoder import CausalLM
from models.spec import ModelSpec, count_params
from multipruner_jax import data
from multipruner_jax import mesh as mesh_lib
from multipruner_jax.model_loader import load_model, load_tokenizer, resolve_model
from multipruner_jax.scoring import Scorer


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


def evaluate(
    path: str,
    *,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    windows: int = 0,
    dtype: jnp.dtype = jnp.float32,
    mesh_shape: tuple[int, ...] | None = None,
    batch_size: int = 0,
    cache_dir: str | None = None,
    tasks: tuple[str, ...] = (),
    limit: int = 0,
    num_fewshot: int = 0,
    task_data: str = "auto",
    task_batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Perplexity of the model at ``path`` (HF dir, Hub id or checkpoint) on ``dataset``, and
    its zero-shot ``tasks`` through lm-evaluation-harness (see ``zeroshot``).

    ``windows``: the first N rows of ``seqlen`` tokens; 0 means the whole split. ``limit``: the
    first N documents of each task; 0 means all. ``task_data``: ``auto``, ``hub`` or ``local``
    (see ``task_data``). The task data is checked and loaded before the model.
    """
    if windows < 0:
        raise ValueError(f"--windows={windows}: expected 0 (all) or a positive count")
    if seqlen < 2:
        raise ValueError(f"--seqlen={seqlen}: expected at least 2 tokens per row")
    if limit < 0:
        raise ValueError(f"--limit={limit}: expected 0 (all documents) or a positive count")
    data.check_source(dataset, evaluation=True)
    mesh = mesh_lib.make_mesh(mesh_shape)
    mesh_lib.check_batch_size("--batch_size", batch_size, mesh.shape["data"], zero=True)
    loaded = None
    if tasks:
        from multipruner_jax import task_data as task_data_lib

        mesh_lib.check_batch_size("--task_batch_size", task_batch_size, mesh.shape["data"])
        source = task_data_lib.check(tasks, task_data, num_fewshot)
        resolve_model(path, weights=False)
        loaded = task_data_lib.load_tasks(tasks, source)
    local = resolve_model(path)
    tokenizer = load_tokenizer(local)
    tokens = data.evaluation_windows(dataset, tokenizer, seqlen=seqlen, cache_dir=cache_dir)
    if windows:
        tokens = tokens[:windows]
    model = load_model(local, dtype, functools.partial(mesh_lib.param_sharding, mesh))
    ppl = evaluate_perplexity(model, tokens, batch_size or mesh.shape["data"], mesh)
    result = {
        "model": path,
        "dataset": dataset,
        "seqlen": seqlen,
        "rows": int(tokens.shape[0]),
        "params": count_params(model.spec),
        "perplexity": ppl,
    }
    if loaded is not None:
        from multipruner_jax import zeroshot
        from multipruner_jax.lm_eval_adapter import JaxLM

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
