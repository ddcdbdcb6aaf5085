"""The prune job end to end: check options, load, calibrate, search (or apply a config), save.

Output directory layout (``output_path``):

* ``flags.txt``: the effective flags the script passes in, written with the first output;
* ``search_state.json``: accepted steps and the settings they belong to, rewritten atomically
  after every step (``--resume`` replays it);
* ``pruned_model_configs/config.{block|mlp_width|attn_head}.{step}.json``: the config after each
  step; ``pruning_config.json``: the final config (reference schema + ``weight_reorder``);
* ``log.json``: one record per step (reference keys plus timings and compile counts);
* ``checkpoint/``: the pruned model (orbax params + ``spec.json`` + tokenizer);
* with ``--refine`` (``refine.py``): ``pruning_config.greedy.json`` (the greedy result),
  ``config.refine.{n}.json`` after each accepted move, the moves in ``log.json`` and in the
  search state (``"refine"``), and ``pruning_config.json`` the refined configuration;
* ``report.svg``/``report.png``: the picture of the run (``report.py``, unless ``--noreport``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from models.decoder import CausalLM
from models.spec import ModelSpec, count_params, pruned_ratio
from multipruner_jax.base import atomic, ownership
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.base.cli import option
from multipruner_jax.base.console import StatusLine
from multipruner_jax.evals.evaluation import evaluate_perplexity
from multipruner_jax.exporting import export
from multipruner_jax.prune import refine, search, surgery
from multipruner_jax.prune.progress import ConsoleProgress, summary_table
from multipruner_jax.runtime.scoring import Scorer, prefix_cache_bytes
from multipruner_jax.storage import checkpoint, data, hf_io, model_source, pruning_config
from multipruner_jax.storage.hf_io import COMPUTE_DTYPES
from multipruner_jax.storage.job import JobFolder, check_resume_identity, is_writer, say
from multipruner_jax.storage.model_loader import load_tokenizer

STATE_FILE = "search_state.json"
GREEDY_CONFIG = "pruning_config.greedy.json"
CONFIGS_DIR = "pruned_model_configs"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneOptions:
    """Everything the prune job needs; field names follow the reference CLI where it has one.
    Each field is also ``scripts/prune.py``'s flag of that name (``cli.define_flags``)."""

    model_path: str = option(help="HF model directory or Hub id 'org/name'.")
    output_path: str = option(help="Output folder (see README).")
    weight_reorder: bool = option(False, "Reorder MLP channels and heads/KV groups by magnitude.")
    target_ratio: float = option(20.0, "Percent of all parameters to remove.")
    pruning_distribution: str = option("44:52:4", "Shares 'a:b:c' of blocks:MLP:heads.")
    mlp_channel_group_size: int = option(1024, "MLP channels removed per step.")
    attn_channel_group_size: int = option(128, "Query channels removed per step (whole KV groups).")
    calibration_dataset: str = option(
        "alpaca",
        "alpaca|wikitext2|c4|ptb, or a local .txt/.jsonl/.json file, folder of .txt, or Arrow "
        "folder.",
    )
    num_calibration_samples_block: int = option(256, "Records drawn for the block stage.")
    num_calibration_samples_width: int = option(
        128, "Records drawn for the MLP-width and head stages."
    )
    seqlen: int = option(2048, "Tokens per calibration/evaluation row.")
    seed: int = option(42, "Sampling seed for the calibration subsets.")
    pruned_model_config_file: str | None = option(
        None, "Apply this pruning_config.json instead of searching."
    )
    dtype: str = option("float32", "Parameter and compute dtype.", choices=COMPUTE_DTYPES)
    mesh_shape: str = option("", "'data,model' or 'candidate,data,model'; default all on data.")
    batch_size: int = option(0, "Rows per scoring batch; 0 = one per device.")
    prefix_cache: bool = option(True, "Reuse cached layer inputs below a candidate.")
    bound: bool = option(True, "Stop scoring candidates that provably cannot win.")
    token_chunk: int = option(512, "Positions per fp32 logits chunk.")
    resume: bool = option(False, "Continue the search saved in --output_path.")
    eval_dataset: str = option(
        "wikitext2", "Perplexity set reported before and after (wikitext2 or path)."
    )
    eval_windows: int = option(0, "Evaluation rows: 0 none, -1 all, N first.")
    cache_dir: str | None = option(None, "Token-window cache folder (default: no cache).")
    export_hf: str | None = option(None, "Also export the pruned model to this folder.")
    export_format: str = option(
        "compact",
        "Format of --export_hf: "
        + "; ".join(f"{k}: {f.summary}" for k, f in export.FORMATS.items()),
        choices=export.FORMATS,
    )
    export_dtype: str = option(
        "float32", "Tensor dtype of --export_hf (q8_0: gguf).", choices=export.DTYPES
    )
    export_overwrite: bool = option(False, "Replace a non-empty --export_hf.")
    near_tie_margin: float = option(
        0.0,
        "Re-score a step's candidates within this relative margin of the best on every "
        "calibration row before choosing (0 = off: the reference's rule).",
    )
    refine: bool = option(
        False, "After the greedy search, apply size-keeping swaps that lower perplexity."
    )
    refine_budget: str = option(
        "", "Refinement limit: moves to score ('500'), time ('30m', '900s'), or both ('500,30m')."
    )
    refine_cross_kind: bool = option(
        False,
        "Refine moves may also restore one kind of unit and remove another of at least its size.",
    )
    refine_finalists: int = option(
        0,
        "Refinement screening: score every move on the width rows first, then only this many "
        "best on every calibration row (0 = every move on every row, exact).",
    )
    report: bool = option(True, "Draw report.svg/report.png in --output_path at the end.")
    quiet: bool = option(False, "No progress output.")

    def search_identity(self) -> dict[str, Any]:
        """The options a resumed search must share with the run it continues, by meaning."""
        return search_identity(dataclasses.asdict(self))


IDENTITY_KEYS = (
    "model_path weight_reorder target_ratio pruning_distribution mlp_channel_group_size "
    "attn_channel_group_size calibration_dataset num_calibration_samples_block "
    "num_calibration_samples_width seqlen seed dtype near_tie_margin"
).split()
# Identity keys added later: a state saved before them had their default.
IDENTITY_DEFAULTS: dict[str, Any] = {"near_tie_margin": 0.0}
REFINE_KEYS = ("refine_cross_kind", "refine_finalists")  # what resumed refine moves must share
REFINE_DEFAULTS: dict[str, Any] = {"refine_finalists": 0}  # keys added later: the default then


def search_identity(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` (ours, or as saved in a search state) reduced to what determines a search:
    local paths made absolute, the distribution normalised, numbers as numbers."""
    identity = {}
    for key in IDENTITY_KEYS:
        value = options.get(key, IDENTITY_DEFAULTS.get(key))
        if key in ("model_path", "calibration_dataset") and isinstance(value, str):
            value = model_source.canonical(value)
        elif key == "pruning_distribution" and isinstance(value, str):
            value = list(search.parse_distribution(value))
        elif key in ("target_ratio", "near_tie_margin") and isinstance(value, int | float):
            value = float(value)
        identity[key] = value
    return identity


@dataclass(frozen=True)
class Plan:
    """A prune job whose options checked out: everything known before any weight is read."""

    opts: PruneOptions
    dense: ModelSpec
    mesh_shape: tuple[int, int, int] | None
    settings: search.Settings | None  # None: apply ``config``
    config: dict[str, Any] | None
    state: search.SearchState  # the steps a resumed search replays
    refine_state: refine.RefineState | None = None  # the moves a resumed refinement replays
    budget: refine.Budget = refine.Budget()


def check_options(opts: PruneOptions) -> Plan:
    """Check every option that can be checked without reading weights; one sentence each.

    Nothing is written: a refused run leaves no trace in ``--output_path``.
    """
    if not 0 < opts.target_ratio < 100:
        raise ValueError(f"--target_ratio={opts.target_ratio}: expected a percentage in (0, 100)")
    distribution = search.parse_distribution(opts.pruning_distribution)
    _check_choice("dtype", opts.dtype, COMPUTE_DTYPES)
    if opts.seqlen < 2:
        raise ValueError(f"--seqlen={opts.seqlen}: expected at least 2 tokens")
    if opts.token_chunk <= 0:
        raise ValueError(f"--token_chunk={opts.token_chunk}: expected a positive count")
    for name in ("num_calibration_samples_block", "num_calibration_samples_width"):
        if getattr(opts, name) <= 0:
            raise ValueError(f"--{name}={getattr(opts, name)}: expected a positive count")
    if not (math.isfinite(opts.near_tie_margin) and opts.near_tie_margin >= 0):
        raise ValueError(
            f"--near_tie_margin={opts.near_tie_margin}: expected a relative margin >= 0 "
            "(0.01 = within 1 % of the best)"
        )
    budget = refine.parse_budget(opts.refine_budget)
    if (opts.refine_budget or opts.refine_cross_kind or opts.refine_finalists) and not opts.refine:
        raise ValueError(
            "--refine_budget, --refine_cross_kind and --refine_finalists need --refine"
        )
    if opts.refine_finalists < 0:
        raise ValueError(f"--refine_finalists must be 0 or more, got {opts.refine_finalists}")
    if opts.pruned_model_config_file and (opts.refine or opts.near_tie_margin):
        raise ValueError(
            "--refine and --near_tie_margin change a search; --pruned_model_config_file runs none"
        )
    if opts.eval_windows < -1:
        raise ValueError(f"--eval_windows={opts.eval_windows}: expected -1 (all), 0 or a count")
    mesh_shape = mesh_lib.parse_mesh_shape(opts.mesh_shape)
    devices = jax.device_count()
    if mesh_shape and math.prod(mesh_shape) > devices:
        raise ValueError(
            f"--mesh_shape={opts.mesh_shape} needs {math.prod(mesh_shape)} devices; "
            f"{devices} are available"
        )
    _, data_axis, _ = mesh_shape or (1, devices, 1)
    mesh_lib.check_batch_size("--batch_size", opts.batch_size, data_axis, zero=True)
    _check_output_path(opts.output_path)
    if opts.export_hf:
        _check_choice("export_format", opts.export_format, export.FORMATS)
        _check_choice("export_dtype", opts.export_dtype, export.DTYPES)
        export.check_output(
            opts.export_hf, opts.export_overwrite, "--export_hf", "--export_overwrite"
        )
        _check_export_path(opts.export_hf, opts.output_path, opts.model_path)
        if jax.process_count() > 1:
            raise ValueError("--export_hf runs in one process; export the checkpoint afterwards")
    if opts.eval_windows:
        data.check_source(opts.eval_dataset, evaluation=True)
    dense = hf_io.read_dense_spec(model_source.resolve(opts.model_path, weights=False))
    if opts.export_hf:
        export.check_format(
            opts.export_format, opts.export_dtype, dense.model_type, "--export_format"
        )
    if opts.seqlen > dense.max_position_embeddings:
        log.warning(
            "--seqlen=%d is above the model's max_position_embeddings (%d): positions past it "
            "were never trained, so perplexities (and decisions) may not mean much",
            opts.seqlen,
            dense.max_position_embeddings,
        )
    if opts.pruned_model_config_file:
        if os.path.exists(os.path.join(opts.output_path, STATE_FILE)):
            raise ValueError(
                f"--output_path={opts.output_path} holds a search, whose checkpoint "
                "--pruned_model_config_file would replace; choose another output path"
            )
        config = pruning_config.load(opts.pruned_model_config_file)
        pruning_config.to_spec(dense, config)
        if config.get("weight_reorder", opts.weight_reorder) != opts.weight_reorder:
            raise ValueError(
                f"{opts.pruned_model_config_file} was made with weight_reorder="
                f"{config['weight_reorder']}, but --weight_reorder={opts.weight_reorder}"
            )
        return Plan(opts, dense, mesh_shape, None, config, search.SearchState())
    search.check_group_sizes(dense, opts.mlp_channel_group_size, opts.attn_channel_group_size)
    settings = search.Settings(
        target_ratio=opts.target_ratio,
        distribution=distribution,
        mlp_group=opts.mlp_channel_group_size,
        attn_group=opts.attn_channel_group_size,
        prefix_cache=opts.prefix_cache,
        bound=opts.bound,
        near_tie=opts.near_tie_margin,
    )
    search.check_targets(dense, settings)
    data.check_source(opts.calibration_dataset)
    state, refine_state = _saved_state(opts, dense, settings)
    return Plan(opts, dense, mesh_shape, settings, None, state, refine_state, budget)


def _check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{flag}={value!r}: expected one of {', '.join(choices)}")


def _check_output_path(path: str) -> None:
    """``path`` is a job folder this process can write, whose checkpoint can be replaced."""
    JobFolder(path).check()
    ckpt = os.path.join(path, checkpoint.DIR)
    atomic.check_replaceable(ckpt, f"{ckpt} (the checkpoint)")


def _check_export_path(export_hf: str, output_path: str, model_path: str) -> None:
    """The export may live inside ``--output_path`` but must not replace it or its checkpoint,
    nor the model it reads."""
    out = os.path.realpath(output_path)
    ckpt = os.path.join(out, checkpoint.DIR)
    if atomic.replaces(export_hf, out) or atomic.overlaps(export_hf, ckpt):
        raise ValueError(
            f"--export_hf={export_hf} would replace --output_path={output_path} or its "
            "checkpoint; choose a folder of its own (inside the output path is fine)"
        )
    if os.path.exists(model_path) and atomic.overlaps(export_hf, model_path):
        raise ValueError(
            f"--export_hf={export_hf} would replace the model it is pruned from "
            f"(--model_path={model_path}); choose a folder of its own"
        )


def _saved_state(opts: PruneOptions, dense: ModelSpec, settings: search.Settings):
    """The steps to replay: none for a new search, the saved ones for ``--resume``."""
    path = JobFolder(opts.output_path).check_start(STATE_FILE, opts.resume, "a search")
    if not opts.resume:
        return search.SearchState(), None
    try:
        saved = atomic.read_json(path)
        state = search.SearchState.from_dict(saved)
        lacking = [
            k for k in IDENTITY_KEYS if saved["options"].get(k, IDENTITY_DEFAULTS.get(k)) is None
        ]
        if lacking:
            raise ValueError(f"its options block lacks {', '.join(lacking)}")
        options = search_identity(saved["options"])
        greedy = search.replay(state, dense, settings)
        saved_refine = saved.get("refine")
        refine_state = None
        if saved_refine is not None:
            refine_state = refine.RefineState.from_dict(saved_refine)
            refine.replay(refine_state, greedy, dense, settings)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(
            f"--resume: {path} is not a valid search state ({type(error).__name__}: {error}); "
            "remove it to start afresh"
        ) from None
    check_resume_identity(options, opts.search_identity(), "search", opts.output_path)
    if refine_state is not None and refine_state.moves:
        if not opts.refine:
            raise ValueError(
                f"--resume: {path} holds {len(refine_state.moves)} refine moves; pass --refine "
                "to continue them, or remove the file to search afresh"
            )
        now = {k: getattr(opts, k) for k in REFINE_KEYS}
        saved_options = {**REFINE_DEFAULTS, **saved_refine.get("options", {})}
        if saved_options != now:
            raise ValueError(
                f"--resume: the saved refinement used other options (saved, now): "
                f"{saved_options}, {now}"
            )
    return state, refine_state


def _say(opts: PruneOptions, text: str) -> None:
    say(text, opts.quiet)


class _Outputs:
    """Writes the files of a job in ``--output_path`` (process 0 only).

    ``flags.txt`` is written with the first real output, so a run refused before it (for example
    by a checkpoint whose tensors do not fit) leaves no folder holding only flags.
    """

    def __init__(self, plan: Plan, flags_text: str | None):
        self.plan, self.flags_text = plan, flags_text
        self.out = plan.opts.output_path
        self.writer = is_writer()
        self.greedy = plan.state
        self.refined: refine.RefineState | None = plan.refine_state

    def started(self) -> None:
        JobFolder(self.out).write_flags(self.flags_text)

    def search_config(
        self, state: search.SearchState, refined: refine.RefineState | None = None
    ) -> dict[str, Any]:
        """The reference schema after ``state``'s steps (and ``refined``'s moves)."""
        settings = self.plan.settings
        spec = search.replay(state, self.plan.dense, settings)
        attn, mlp = search.removal_orders(state)
        if refined is not None:
            spec = refine.replay(refined, spec, self.plan.dense, settings)
            attn, mlp = refine.removal_orders(state, refined)
        return pruning_config.from_spec(
            spec, attn_order=attn, mlp_order=mlp, weight_reorder=self.plan.opts.weight_reorder
        )

    def on_step(self, state: search.SearchState, model: CausalLM) -> None:
        self.greedy = state
        if self.writer:
            atomic.write_json(self._step_config(state.steps[-1]), self.search_config(state))
            self._write_state()

    def on_move(self, refined: refine.RefineState, model: CausalLM) -> None:
        self.refined = refined
        if self.writer:
            path = self._move_config(refined.moves[-1])
            atomic.write_json(path, self.search_config(self.greedy, refined))
            self._write_state()

    def _write_state(self) -> None:
        """``log.json`` and ``search_state.json`` for the greedy steps and refine moves so far."""
        state, refined = self.greedy, self.refined
        log = [
            {
                "step": s.step,
                "pruning_target": s.stage,
                "importance": s.ppl,
                "ratio": s.ratio,
                "config_save_to": self._step_config(s),
                **dataclasses.asdict(s),
            }
            for s in state.steps
        ]
        saved = {"options": self.plan.opts.search_identity(), **state.to_dict()}
        if refined is not None:
            log += [
                {
                    "step": len(state.steps) + m.step,
                    "pruning_target": "refine",
                    "importance": m.ppl,
                    "ratio": m.ratio,
                    "config_save_to": self._move_config(m),
                    "stage": "refine",
                    "move": m.step,
                    **{k: v for k, v in dataclasses.asdict(m).items() if k != "step"},
                }
                for m in refined.moves
            ]
            options = {k: getattr(self.plan.opts, k) for k in REFINE_KEYS}
            saved["refine"] = {"options": options, **refined.to_dict()}
        atomic.write_json(os.path.join(self.out, "log.json"), {"steps": log})
        atomic.write_json(os.path.join(self.out, STATE_FILE), saved)

    def _step_config(self, step: search.Step) -> str:
        name = f"config.{step.stage}.{step.step}.json"
        return os.path.join(self.out, CONFIGS_DIR, name)

    def _move_config(self, move: refine.Move) -> str:
        return os.path.join(self.out, CONFIGS_DIR, f"config.refine.{move.step}.json")

    def greedy_config(self, config: dict[str, Any]) -> None:
        """The greedy result beside the refined one (``pruning_config.greedy.json``)."""
        if self.writer:
            atomic.write_json(os.path.join(self.out, GREEDY_CONFIG), config)

    def final(self, config: dict[str, Any]) -> None:
        if self.writer:
            atomic.write_json(os.path.join(self.out, pruning_config.FILE), config)


@dataclass
class _Job:
    """What both prune jobs share: the plan, devices, tokenizer, outputs and the summary."""

    plan: Plan
    model_dir: str
    mesh: Mesh
    tokenizer: Any
    outputs: _Outputs
    summary: dict[str, Any]
    eval_tokens: np.ndarray | None = None

    @property
    def opts(self) -> PruneOptions:
        return self.plan.opts

    @property
    def batch_size(self) -> int:
        return self.opts.batch_size or self.mesh.shape["data"]

    def sharding_for(self, path: str, shape: tuple[int, ...]) -> jax.sharding.Sharding:
        return mesh_lib.param_sharding(self.mesh, path, shape)

    def load_dense(self) -> CausalLM:
        """The dense model (reordered if asked), its perplexity recorded when evaluating."""
        opts = self.opts
        model = hf_io.load_model(
            self.model_dir, COMPUTE_DTYPES[opts.dtype], self.sharding_for, spec=self.plan.dense
        )
        self.outputs.started()
        _say(opts, f"loaded {opts.model_path}: {count_params(self.plan.dense):,} parameters")
        if opts.weight_reorder:
            surgery.reorder(model)
        if self.eval_tokens is not None:
            self.summary["dense_ppl"] = self.perplexity(model)
            _say(opts, f"dense {opts.eval_dataset} perplexity: {self.summary['dense_ppl']:.4f}")
            if not math.isfinite(self.summary["dense_ppl"]):
                log.warning(
                    "the dense model's %s perplexity is %s: its weights or --dtype=%s overflow, "
                    "so the search compares meaningless scores",
                    opts.eval_dataset,
                    self.summary["dense_ppl"],
                    opts.dtype,
                )
        return model

    def perplexity(self, model: CausalLM) -> float:
        return evaluate_perplexity(model, self.eval_tokens, self.batch_size, self.mesh)


def run(opts: PruneOptions, flags_text: str | None = None) -> dict[str, Any]:
    """Run the prune job; returns a summary (parameter counts, ratio, perplexities, paths).

    ``flags_text`` (the effective flags) is written to ``flags.txt`` with the first output.
    Raises ``TargetNotReached`` (after writing every output) when a stage ran out of candidates.
    """
    _check_output_path(opts.output_path)
    with JobFolder(opts.output_path).owned():
        return _run(opts, flags_text)


def _run(opts: PruneOptions, flags_text: str | None) -> dict[str, Any]:
    """``run`` once this process owns the output folder."""
    plan = check_options(opts)
    t0 = time.perf_counter()
    ckpt = os.path.join(opts.output_path, checkpoint.DIR)
    if is_writer():  # what killed runs left: dead writes, an interrupted replace
        with ownership.lock(ckpt):
            atomic.recover(ckpt)
        for folder in (opts.output_path, os.path.join(opts.output_path, CONFIGS_DIR)):
            atomic.remove_dead_temporaries(folder)
    model_dir = model_source.resolve(opts.model_path)
    job = _Job(
        plan=plan,
        model_dir=model_dir,
        mesh=mesh_lib.make_mesh(plan.mesh_shape),
        tokenizer=load_tokenizer(model_dir),
        outputs=_Outputs(plan, flags_text),
        summary={"dense_params": count_params(plan.dense)},
    )
    if opts.eval_windows:
        job.eval_tokens = _eval_tokens(opts, job.tokenizer)
    if plan.settings is None:
        model, final_config, steps, shortfalls = _apply_config(job)
    else:
        model, final_config, steps, shortfalls = _search(job, plan.settings)
    job.outputs.final(final_config)
    checkpoint.save(ckpt, model, tokenizer=job.tokenizer)
    summary = job.summary
    summary.update(
        pruned_params=count_params(model.spec),
        ratio=pruned_ratio(model.spec, plan.dense),
        steps=len(steps),
        checkpoint=ckpt,
    )
    if plan.settings is not None:
        summary.update(
            target_ratio=opts.target_ratio,
            target_reached=not shortfalls and summary["ratio"] >= opts.target_ratio,
            shortfalls=[s.describe() for s in shortfalls],
        )
    if job.eval_tokens is not None:
        summary["pruned_ppl"] = job.perplexity(model)
    if opts.export_hf:
        summary["export_padding"] = export.export(
            model,
            opts.export_hf,
            fmt=opts.export_format,
            dtype=opts.export_dtype,
            tokenizer=job.tokenizer,
            config=final_config if opts.export_format == "compact" else None,
            overwrite=opts.export_overwrite,
        )
        summary["export_hf"] = opts.export_hf
    summary["seconds"] = time.perf_counter() - t0
    if opts.report and jax.process_index() == 0:
        from multipruner_jax.prune import report  # matplotlib loads only here

        summary["report"] = report.draw(
            [report.load_run(opts.output_path)], os.path.join(opts.output_path, "report")
        )
    if steps:
        _say(opts, summary_table(steps))
    _say(opts, format_summary(summary))
    if summary.get("target_reached") is False:
        raise TargetNotReached(summary)
    return summary


class TargetNotReached(ValueError):
    """The options asked for more than the search could remove (every output is still written)."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        reasons = "; ".join(summary["shortfalls"]) or "the search stopped early"
        super().__init__(
            f"--target_ratio={summary['target_ratio']:g} was not reached ({reasons}); the "
            f"checkpoint holds the model at {summary['ratio']:.2f}% removed"
        )


def _apply_config(job: _Job):
    """The ``--pruned_model_config_file`` job: shrink the dense model to the given config."""
    model = job.load_dense()
    spec = pruning_config.to_spec(job.plan.dense, job.plan.config)
    model = surgery.shrink(model, spec, job.sharding_for)
    return model, {**job.plan.config, "weight_reorder": job.opts.weight_reorder}, [], []


def _search(job: _Job, settings: search.Settings):
    """The search job: calibrate, search (or resume), with per-step outputs."""
    opts = job.opts
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
    dense_model = model if opts.refine else None  # refinement shrinks it again; else let go
    sets = [("block", block_tokens), ("width", width_tokens)]
    if opts.refine or opts.near_tie_margin:  # every calibration row: the larger objective
        sets.append(("all", np.concatenate([block_tokens, width_tokens])))
    scorers = {
        name: Scorer(
            tokens,
            ignore_id=job.tokenizer.eos_token_id,
            batch_size=job.batch_size,
            mesh=job.mesh,
            token_chunk=opts.token_chunk,
        )
        for name, tokens in sets
    }
    settings = dataclasses.replace(
        settings,
        prefix_cache=_use_prefix_cache(
            opts, job.plan.dense, dict(sets).get("all", block_tokens), job.mesh
        ),
    )
    model, state = search.search(
        model,
        job.plan.dense,
        scorers,
        settings,
        state=job.plan.state,
        on_step=job.outputs.on_step,
        progress=ConsoleProgress(enabled=not opts.quiet and is_writer()),
        sharding_for=job.sharding_for,
    )
    config = job.outputs.search_config(state)
    if opts.refine:
        job.outputs.greedy_config(config)
        job.outputs.refined = job.plan.refine_state or refine.RefineState()
        t0, line = time.perf_counter(), StatusLine()
        model, refined = refine.refine(
            dense_model,
            model.spec,
            job.plan.dense,
            scorers["all"],
            settings,
            budget=job.plan.budget,
            cross_kind=opts.refine_cross_kind,
            state=job.outputs.refined,
            screen=scorers["width"],
            finalists=opts.refine_finalists,
            on_move=job.outputs.on_move,
            say=lambda text: (line.clear(), _say(opts, text)),
            status=line.show if not opts.quiet and is_writer() else lambda text: None,
            sharding_for=job.sharding_for,
        )
        del dense_model
        config = job.outputs.search_config(state, refined)
        job.summary["refine"] = {
            "moves": len(refined.moves),
            "evaluations": refined.evaluations,
            "stopped": refined.stopped,
            "seconds": time.perf_counter() - t0,
        }
    job.summary["compiles"] = {name: s.compiles.count for name, s in scorers.items()}
    return model, config, state.steps, state.shortfalls


def _free_device_bytes() -> int:
    """Free memory of the first local device (accelerators), or available host RAM (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _use_prefix_cache(opts: PruneOptions, dense: ModelSpec, rows, mesh) -> bool:
    """Prefix caching if asked for and its activations fit half the free memory."""
    if not opts.prefix_cache:
        return False
    need = prefix_cache_bytes(dense, rows.shape[0], opts.seqlen, COMPUTE_DTYPES[opts.dtype])
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
    if summary.get("target_reached"):
        lines.append(f"target {summary['target_ratio']:g}% reached")
    elif "target_reached" in summary:
        lines.append(f"target {summary['target_ratio']:g}% NOT reached")
        lines += [f"  {reason}" for reason in summary["shortfalls"]]
    if "dense_ppl" in summary:
        lines.append(
            f"perplexity: dense {summary['dense_ppl']:.4f} -> pruned {summary['pruned_ppl']:.4f}"
        )
    if "refine" in summary:
        r = summary["refine"]
        lines.append(
            f"refine: {r['moves']} moves accepted, {r['evaluations']} scored, "
            f"{r['seconds']:.0f}s, stopped: {r['stopped']}"
        )
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if "export_hf" in summary:
        lines.append(f"export: {summary['export_hf']}")
        lines.append(summary["export_padding"])
    if "report" in summary:
        lines.append(f"picture: {summary['report'][0]} (and .png)")
    return "\n".join(lines)
