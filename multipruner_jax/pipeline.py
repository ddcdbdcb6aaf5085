"""The prune job end to end: check options, load, calibrate, search (or apply a config), save.

Output directory layout (``output_path``):

* ``flags.txt``: the effective flags (written by the script);
* ``search_state.json``: accepted steps and the settings they belong to, rewritten atomically
  after every step (``--resume`` replays it);
* ``pruned_model_configs/config.{block|mlp_width|attn_head}.{step}.json``: the config after each
  step; ``pruning_config.json``: the final config (reference schema + ``weight_reorder``);
* ``log.json``: one record per step (reference keys plus timings and compile counts);
* ``checkpoint/``: the pruned model (orbax params + ``spec.json`` + tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models.decoder import CausalLM
from models.spec import ModelSpec, count_params, pruned_ratio
from multipruner_jax import (
    atomic,
    checkpoint,
    data,
    hf_io,
    model_source,
    pruning_config,
    search,
    surgery,
)
from multipruner_jax import mesh as mesh_lib
from multipruner_jax.evaluation import evaluate_perplexity, load_tokenizer
from multipruner_jax.progress import ConsoleProgress, summary_table
from multipruner_jax.scoring import MODES, Scorer, prefix_cache_bytes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STATE_FILE = "search_state.json"


@dataclass(frozen=True)
class PruneOptions:
    """Everything the prune job needs; field names follow the reference CLI where it has one."""

    model_path: str
    output_path: str
    weight_reorder: bool = False
    target_ratio: float = 20.0
    pruning_distribution: str = "44:52:4"
    mlp_channel_group_size: int = 1024
    attn_channel_group_size: int = 128
    calibration_dataset: str = "alpaca"
    num_calibration_samples_block: int = 256
    num_calibration_samples_width: int = 128
    seqlen: int = 2048
    seed: int = 42
    pruned_model_config_file: str | None = None
    dtype: str = "float32"
    mesh_shape: str = ""
    batch_size: int = 0
    scoring_mode: str = "layer"
    prefix_cache: bool = True
    token_chunk: int = 512
    resume: bool = False
    eval_dataset: str = "wikitext2"
    eval_windows: int = 0
    cache_dir: str | None = None
    quiet: bool = False

    def search_identity(self) -> dict[str, Any]:
        """The options a resumed search must share with the run it continues."""
        keys = (
            "model_path weight_reorder target_ratio pruning_distribution mlp_channel_group_size "
            "attn_channel_group_size calibration_dataset num_calibration_samples_block "
            "num_calibration_samples_width seqlen seed dtype"
        ).split()
        return {k: getattr(self, k) for k in keys}


def check_options(opts: PruneOptions) -> tuple[ModelSpec, search.Settings | None]:
    """Validate every option that can be checked without loading weights; one error each."""
    if not 0 < opts.target_ratio < 100:
        raise ValueError(f"--target_ratio={opts.target_ratio}: expected a percentage in (0, 100)")
    distribution = search.parse_distribution(opts.pruning_distribution)
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype={opts.dtype!r}: expected one of {', '.join(DTYPES)}")
    if opts.scoring_mode not in MODES:
        raise ValueError(f"--scoring_mode={opts.scoring_mode!r}: expected one of {MODES}")
    if opts.seqlen < 2:
        raise ValueError(f"--seqlen={opts.seqlen}: expected at least 2 tokens")
    for name in ("num_calibration_samples_block", "num_calibration_samples_width"):
        if getattr(opts, name) <= 0:
            raise ValueError(f"--{name}={getattr(opts, name)}: expected a positive count")
    if opts.batch_size < 0:
        raise ValueError(f"--batch_size={opts.batch_size}: expected >= 0 (0 = one row per device)")
    shape = mesh_lib.parse_mesh_shape(opts.mesh_shape) or (jax.device_count(), 1)
    if opts.batch_size % shape[0]:
        raise ValueError(
            f"--batch_size={opts.batch_size} is not a multiple of the mesh's data axis {shape[0]}"
        )
    if not opts.output_path:
        raise ValueError("--output_path is required")
    state_path = os.path.join(opts.output_path, STATE_FILE)
    if opts.resume and not os.path.isfile(state_path):
        raise ValueError(f"--resume: {state_path} does not exist; nothing to resume")
    if not opts.resume and os.path.exists(state_path):
        raise ValueError(
            f"--output_path={opts.output_path} already holds a search; pass --resume to continue "
            "it or choose another output path"
        )
    spec = hf_io.read_dense_spec(model_source.resolve(opts.model_path))
    if opts.pruned_model_config_file:
        pruning_config.to_spec(spec, pruning_config.load(opts.pruned_model_config_file))
        return spec, None
    search.check_group_sizes(spec, opts.mlp_channel_group_size, opts.attn_channel_group_size)
    settings = search.Settings(
        target_ratio=opts.target_ratio,
        distribution=distribution,
        mlp_group=opts.mlp_channel_group_size,
        attn_group=opts.attn_channel_group_size,
        prefix_cache=opts.prefix_cache,
    )
    return spec, settings


def _say(opts: PruneOptions, text: str) -> None:
    if not opts.quiet and jax.process_index() == 0:
        print(text, flush=True)


class _Outputs:
    """Writes the per-step files of a search (process 0 only)."""

    def __init__(self, opts: PruneOptions, dense: ModelSpec, settings: search.Settings):
        self.opts, self.dense, self.settings = opts, dense, settings
        self.writer = jax.process_index() == 0

    def config(self, state: search.SearchState) -> dict[str, Any]:
        attn, mlp = search.removal_orders(state)
        return pruning_config.from_spec(
            state.spec(self.dense, self.settings),
            attn_order=attn,
            mlp_order=mlp,
            weight_reorder=self.opts.weight_reorder,
        )

    def on_step(self, state: search.SearchState, model: CausalLM) -> None:
        if not self.writer:
            return
        out = self.opts.output_path
        last = state.steps[-1]
        name = f"config.{last.stage}.{last.step}.json"
        config_path = os.path.join(out, "pruned_model_configs", name)
        atomic.write_json(config_path, self.config(state))
        log = [
            {
                "step": s.step,
                "pruning_target": s.stage,
                "importance": s.ppl,
                "ratio": s.ratio,
                "config_save_to": os.path.join(
                    out, "pruned_model_configs", f"config.{s.stage}.{s.step}.json"
                ),
                **dataclasses.asdict(s),
            }
            for s in state.steps
        ]
        atomic.write_json(os.path.join(out, "log.json"), {"steps": log})
        atomic.write_json(
            os.path.join(out, STATE_FILE),
            {"options": self.opts.search_identity(), **state.to_dict()},
        )


def _load_state(opts: PruneOptions) -> search.SearchState:
    saved = atomic.read_json(os.path.join(opts.output_path, STATE_FILE))
    if saved["options"] != opts.search_identity():
        diff = {
            k: (v, opts.search_identity()[k])
            for k, v in saved["options"].items()
            if opts.search_identity().get(k) != v
        }
        raise ValueError(f"--resume: the saved search used other options (saved, now): {diff}")
    return search.SearchState.from_dict(saved)


@dataclass
class _Job:
    """What both prune jobs share: the options, the dense spec, devices, tokenizer, summary."""

    opts: PruneOptions
    dense: ModelSpec
    model_dir: str
    mesh: Mesh
    tokenizer: Any
    summary: dict[str, Any]
    eval_tokens: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return self.opts.batch_size or self.mesh.shape["data"]

    def sharding_for(self, path: str, shape: tuple[int, ...]) -> jax.sharding.Sharding:
        return mesh_lib.param_sharding(self.mesh, path, shape)

    def load_dense(self) -> CausalLM:
        """The dense model (reordered if asked), its perplexity recorded when evaluating."""
        opts = self.opts
        model = hf_io.load_model(
            self.model_dir, DTYPES[opts.dtype], self.sharding_for, spec=self.dense
        )
        _say(opts, f"loaded {opts.model_path}: {count_params(self.dense):,} parameters")
        if opts.weight_reorder:
            surgery.reorder(model)
        if opts.eval_windows:
            self.eval_tokens = _eval_tokens(opts, self.tokenizer)
            self.summary["dense_ppl"] = self.perplexity(model)
            _say(opts, f"dense {opts.eval_dataset} perplexity: {self.summary['dense_ppl']:.4f}")
        return model

    def perplexity(self, model: CausalLM) -> float:
        return evaluate_perplexity(model, self.eval_tokens, self.batch_size, self.mesh)


def run(opts: PruneOptions, flags_text: str | None = None) -> dict[str, Any]:
    """Run the prune job; returns a summary (parameter counts, ratio, perplexities, paths).

    ``flags_text`` (the effective flags) is written to ``flags.txt`` once the options check out.
    """
    dense, settings = check_options(opts)
    if flags_text is not None and jax.process_index() == 0:
        atomic.write_text(os.path.join(opts.output_path, "flags.txt"), flags_text)
    t0 = time.perf_counter()
    model_dir = model_source.resolve(opts.model_path)
    job = _Job(
        opts=opts,
        dense=dense,
        model_dir=model_dir,
        mesh=mesh_lib.make_mesh(mesh_lib.parse_mesh_shape(opts.mesh_shape)),
        tokenizer=load_tokenizer(model_dir),
        summary={"dense_params": count_params(dense)},
    )
    if settings is None:
        model, final_config, steps = _apply_config(job)
    else:
        model, final_config, steps = _search(job, settings)
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(opts.output_path, pruning_config.FILE), final_config)
    ckpt = os.path.join(opts.output_path, "checkpoint")
    checkpoint.save(ckpt, model, tokenizer=job.tokenizer)
    summary = job.summary
    summary.update(
        pruned_params=count_params(model.spec),
        ratio=pruned_ratio(model.spec, dense),
        steps=len(steps),
        checkpoint=ckpt,
        seconds=time.perf_counter() - t0,
    )
    if job.eval_tokens is not None:
        summary["pruned_ppl"] = job.perplexity(model)
    if steps:
        _say(opts, summary_table(steps))
    _say(opts, format_summary(summary))
    return summary


def _apply_config(job: _Job) -> tuple[CausalLM, dict[str, Any], list[search.Step]]:
    """The ``--pruned_model_config_file`` job: shrink the dense model to the given config."""
    opts = job.opts
    config = pruning_config.load(opts.pruned_model_config_file)
    if "weight_reorder" in config and config["weight_reorder"] != opts.weight_reorder:
        raise ValueError(
            f"{opts.pruned_model_config_file} was made with weight_reorder="
            f"{config['weight_reorder']}, but --weight_reorder={opts.weight_reorder}"
        )
    model = job.load_dense()
    spec = pruning_config.to_spec(job.dense, config)
    model = surgery.shrink(model, spec, job.sharding_for)
    return model, {**config, "weight_reorder": opts.weight_reorder}, []


def _search(
    job: _Job, settings: search.Settings
) -> tuple[CausalLM, dict[str, Any], list[search.Step]]:
    """The search job: calibrate, search (or resume), with per-step outputs."""
    opts = job.opts
    state = _load_state(opts) if opts.resume else search.SearchState()
    width_tokens, block_tokens = data.calibration_windows(
        opts.calibration_dataset,
        job.tokenizer,
        seqlen=opts.seqlen,
        num_width=opts.num_calibration_samples_width,
        num_block=opts.num_calibration_samples_block,
        seed=opts.seed,
        cache_dir=opts.cache_dir,
    )
    _say(
        opts,
        f"calibration: {block_tokens.shape[0]} block rows, {width_tokens.shape[0]} width rows "
        f"of {opts.seqlen} tokens from {opts.calibration_dataset}",
    )
    model = job.load_dense()
    scorers = {
        name: Scorer(
            tokens,
            ignore_id=job.tokenizer.eos_token_id,
            batch_size=job.batch_size,
            mesh=job.mesh,
            token_chunk=opts.token_chunk,
            mode=opts.scoring_mode,
        )
        for name, tokens in (("block", block_tokens), ("width", width_tokens))
    }
    settings = dataclasses.replace(
        settings, prefix_cache=_use_prefix_cache(opts, job.dense, block_tokens, job.mesh)
    )
    outputs = _Outputs(opts, job.dense, settings)
    model, state = search.search(
        model,
        job.dense,
        scorers,
        settings,
        state=state,
        on_step=outputs.on_step,
        progress=ConsoleProgress(enabled=not opts.quiet and jax.process_index() == 0),
        sharding_for=job.sharding_for,
    )
    job.summary["compiles"] = {name: s.compiles.count for name, s in scorers.items()}
    return model, outputs.config(state), state.steps


def _free_device_bytes() -> int:
    """Free memory of the first local device (accelerators), or available host RAM (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _use_prefix_cache(opts: PruneOptions, dense: ModelSpec, rows, mesh) -> bool:
    """Prefix caching if asked for, in layer mode, and its activations fit half the free memory."""
    if not opts.prefix_cache or opts.scoring_mode != "layer":
        return False
    need = prefix_cache_bytes(dense, rows.shape[0], opts.seqlen, DTYPES[opts.dtype])
    need //= mesh.shape["data"]
    fits = need <= _free_device_bytes() // 2
    if not fits:
        _say(opts, f"prefix cache off: {need / 2**30:.1f} GiB of activations per device won't fit")
    return fits


def _eval_tokens(opts: PruneOptions, tokenizer):
    tokens = data.evaluation_windows(
        opts.eval_dataset, tokenizer, seqlen=opts.seqlen, cache_dir=opts.cache_dir
    )
    return tokens if opts.eval_windows < 0 else tokens[: opts.eval_windows]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"parameters: dense {summary['dense_params']:,} -> pruned {summary['pruned_params']:,} "
        f"({summary['ratio']:.2f}% removed, {summary['steps']} steps, "
        f"{summary['seconds']:.0f}s)"
    ]
    if "dense_ppl" in summary:
        lines.append(
            f"perplexity: dense {summary['dense_ppl']:.4f} -> pruned {summary['pruned_ppl']:.4f}"
        )
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
