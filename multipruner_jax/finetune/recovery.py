"""Recovery fine-tuning of a pruned model with LoRA: the resumable run and the merge.

``finetune(opts)`` loads the model (one of our checkpoints or an HF directory) with its base in
``--dtype``, adds float32 LoRA adapters to every surviving targeted projection, and trains them
with AdamW on instruction records or plain text (``finetune_data``), ``--grad_accum``
micro-batches of ``--micro_batch_size`` rows per update, data parallel over the mesh. The
held-out loss is measured before training, every ``--eval_every`` updates and at the end; the
adapters with the lowest one are kept. ``--merge`` folds those adapters into a fresh float32
copy of the base (``--merge_dtype``) and writes our checkpoint format, which
``scripts/evaluate.py`` and ``scripts/export_hf.py`` read like any pruned checkpoint.

Output directory (``--output_path``)::

    flags.txt          the effective flags (a reusable flagfile)
    run.json           the options a resumed run must share, the data sizes and step count
    log.json           {"steps": [{step, loss, lr, targets, tokens, seconds}],
                        "evals": [{step, loss, ppl, targets, best}]}, rewritten atomically
    checkpoints/<n>/   orbax, after update n (every --save_every and at the end, last 2 kept):
                       adapters, opt_state, state.json {step, micro_batches, best_loss, best_step}
    best/<n>/          orbax: the adapters with the lowest held-out loss, and that loss
    merged/            with --merge: our checkpoint (spec.json, params/, tokenizer/,
                       recovery.json naming the base and the adapters' step and loss)

Updates are numbered from 1; ``checkpoints/<n>`` holds the state after ``n`` updates, which
have consumed ``n * grad_accum`` micro-batches of the deterministic ``BatchStream``. ``--resume``
restores the latest one, drops log entries and best adapters from later updates, and continues:
data order, dropout masks and optimizer state are those of an uninterrupted run, so the losses
are bit-identical. Only process 0 writes the JSON files; orbax writes checkpoints from every
process. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from multipruner_jax.base import atomic
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.base.cli import option
from multipruner_jax.base.console import clock
from multipruner_jax.finetune import finetune_data, lora
from multipruner_jax.finetune.lora_trainer import Trainer, make_optimizer, make_schedule
from multipruner_jax.storage import checkpoint, job, model_loader, model_source
from multipruner_jax.storage.hf_io import COMPUTE_DTYPES

SCHEDULES = ("linear", "cosine")
RUN_FILE = "run.json"
LOG_FILE = "log.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
MERGED_DIR = "merged"
_ORBAX_TMP = "*.orbax-checkpoint-tmp*"  # orbax's name for a save in progress


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Every setting of a fine-tuning run; defaults follow the reference recipe (§3.4). Each
    field is also ``scripts/finetune.py``'s flag of that name (``cli.define_flags``)."""

    model_path: str = option(help="Pruned checkpoint or HF directory.")
    output_path: str = option(help="Output directory.")
    data: str = option(
        "yahma/alpaca-cleaned",
        "Alpaca .json/.jsonl or Arrow folder, .txt file, folder or glob of .txt, or a hub dataset "
        "id.",
    )
    eval_examples: int = option(2000, "Held-out records or text rows (seed).")
    max_len: int = option(256, "Tokens per example (records are truncated).")
    buckets: int = option(4, "Row lengths compiled (length bucketing).")
    micro_batch_size: int = option(8, "Rows per micro-batch.")
    grad_accum: int = option(4, "Micro-batches per update.")
    max_steps: int = option(0, "Updates; 0 = --epochs over the data.")
    epochs: float = option(2.0, "Epochs when --max_steps=0.")
    learning_rate: float = option(1e-4, "Peak AdamW learning rate.")
    warmup_steps: int = option(100, "Linear warm-up updates.")
    schedule: str = option("linear", "Decay after warm-up.", choices=SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Global-norm clip; 0 = none.")
    lora_rank: int = option(16, "Adapter rank r.")
    lora_alpha: float = option(32.0, "Adapter alpha (scale alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the adapter input.")
    lora_targets: str = option(",".join(lora.TARGETS), "Comma list of q,k,v,o,gate,up,down.")
    dtype: str = option("float32", "Base weights and compute dtype.", choices=COMPUTE_DTYPES)
    mesh_shape: str = option("", "'data,model' device mesh; default all on data.")
    token_chunk: int = option(128, "Positions per fp32 logits chunk.")
    eval_every: int = option(100, "Held-out loss every N updates; 0 = at the end.")
    save_every: int = option(100, "Checkpoint every N updates; 0 = at the end.")
    log_every: int = option(10, "Progress line every N updates; 0 = none.")
    seed: int = option(42, "Seed of the split, data order, adapters and dropout.")
    resume: bool = option(False, "Continue the run saved in --output_path.")
    merge: bool = option(False, "Fold the best adapters into <output_path>/merged.")
    merge_dtype: str = option("float32", "Merged weights dtype.", choices=COMPUTE_DTYPES)
    quiet: bool = option(False, "No progress output.")

    def lora_config(self) -> lora.LoraConfig:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return lora.LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets)

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues."""
        keys = (
            "model_path data eval_examples max_len buckets micro_batch_size grad_accum max_steps "
            "epochs learning_rate warmup_steps schedule weight_decay max_grad_norm lora_rank "
            "lora_alpha lora_dropout lora_targets dtype token_chunk seed"
        ).split()
        identity = {k: getattr(self, k) for k in keys}
        for key in ("model_path", "data"):
            identity[key] = model_source.canonical(identity[key])
        return identity


def check_options(opts: FinetuneOptions) -> None:
    """Validate everything that needs no weights or tokenization; one error sentence each."""
    positive = ("buckets", "micro_batch_size", "grad_accum", "token_chunk")
    for name in positive:
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name}={getattr(opts, name)}: expected a positive integer")
    non_negative = (
        "eval_examples max_steps warmup_steps weight_decay max_grad_norm eval_every save_every "
        "log_every"
    ).split()
    for name in non_negative:
        if getattr(opts, name) < 0:
            raise ValueError(f"--{name}={getattr(opts, name)}: expected 0 or more")
    if opts.max_len < 2:
        raise ValueError(f"--max_len={opts.max_len}: expected at least 2 tokens")
    if opts.max_steps == 0 and not opts.epochs > 0:
        raise ValueError(f"--epochs={opts.epochs}: expected a positive number (or --max_steps)")
    if opts.max_steps and opts.warmup_steps >= opts.max_steps:
        raise ValueError(
            f"--warmup_steps={opts.warmup_steps}: expected fewer than --max_steps={opts.max_steps}"
        )
    if not opts.learning_rate > 0:
        raise ValueError(f"--learning_rate={opts.learning_rate}: expected a positive number")
    if opts.schedule not in SCHEDULES:
        raise ValueError(f"--schedule={opts.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    for name in ("dtype", "merge_dtype"):
        if getattr(opts, name) not in COMPUTE_DTYPES:
            raise ValueError(
                f"--{name}={getattr(opts, name)!r}: expected one of {', '.join(COMPUTE_DTYPES)}"
            )
    opts.lora_config().check()
    data_axis = (
        mesh_lib.parse_mesh_shape(opts.mesh_shape, candidates=False) or (1, jax.device_count(), 1)
    )[1]
    mesh_lib.check_batch_size("--micro_batch_size", opts.micro_batch_size, data_axis)
    local = model_loader.resolve_model(opts.model_path, weights=False)
    if not checkpoint.is_checkpoint(local) and not os.path.isfile(
        os.path.join(local, "config.json")
    ):
        raise FileNotFoundError(
            f"--model_path={opts.model_path}: expected one of our checkpoints, a prune output "
            "folder or an HF directory with config.json"
        )
    finetune_data.source_kind(opts.data)
    folder = job.JobFolder(opts.output_path)
    folder.check()
    run_file = folder.check_start(RUN_FILE, opts.resume, "a fine-tuning run")
    if opts.resume:
        saved = atomic.read_json(run_file)["options"]
        job.check_resume_identity(saved, opts.identity(), "fine-tuning run", opts.output_path)


@dataclasses.dataclass
class _Data:
    """Tokenized training stream, held-out batches and the run length."""

    kind: str
    stream: finetune_data.BatchStream
    heldout: list[finetune_data.Batch]
    train_examples: int
    heldout_examples: int
    dropped: int
    total_steps: int


def _load_data(opts: FinetuneOptions, tokenizer) -> _Data:
    kind, examples = finetune_data.load_examples(opts.data, tokenizer, opts.max_len)
    train_idx, heldout_idx = finetune_data.split_heldout(
        len(examples), opts.eval_examples, opts.seed
    )
    train = [examples[i] for i in train_idx if examples[i].targets]
    heldout = [examples[i] for i in heldout_idx if examples[i].targets]
    lengths = finetune_data.bucket_lengths(opts.max_len, opts.buckets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = finetune_data.BatchStream(train, opts.micro_batch_size, lengths, pad, opts.seed)
    heldout_batches = finetune_data.plan_batches(heldout, opts.micro_batch_size, lengths, pad, None)
    total = opts.max_steps or math.ceil(opts.epochs * stream.per_epoch / opts.grad_accum)
    if opts.warmup_steps >= total:
        raise ValueError(
            f"--warmup_steps={opts.warmup_steps}: expected fewer than the run's {total} updates"
        )
    return _Data(
        kind=kind,
        stream=stream,
        heldout=heldout_batches,
        train_examples=len(train),
        heldout_examples=len(heldout),
        dropped=len(examples) - len(train) - len(heldout),
        total_steps=total,
    )


class _Run:
    """The output directory of one run: checkpoints, best adapters, log and messages."""

    def __init__(self, opts: FinetuneOptions):
        self.opts = opts
        self.path = os.path.abspath(opts.output_path)
        self.main = job.is_writer()
        # Which run this is: recorded in run.json and in every checkpoint it writes.
        run_file = os.path.join(self.path, RUN_FILE)
        self.run_id = atomic.read_json(run_file).get("run_id") if opts.resume else uuid.uuid4().hex
        if self.main:  # saves that died half-way (this process owns the folder)
            for folder in (CHECKPOINTS_DIR, BEST_DIR):
                for stale in glob.glob(os.path.join(self.path, folder, _ORBAX_TMP)):
                    shutil.rmtree(stale, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, enable_async_checkpointing=False
        )
        self.checkpoints = ocp.CheckpointManager(
            os.path.join(self.path, CHECKPOINTS_DIR), options=options
        )
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self.best = ocp.CheckpointManager(os.path.join(self.path, BEST_DIR), options=best_options)
        self.log: dict[str, list[dict[str, Any]]] = {"steps": [], "evals": []}
        self.best_loss = math.inf
        self.best_step = -1

    def say(self, text: str) -> None:
        """A report line (stdout): what was loaded, held-out losses, the merge."""
        job.say(text, self.opts.quiet)

    def progress(self, text: str) -> None:
        """A progress line (stderr): the updates' losses, rates and ETA."""
        job.progress(text, self.opts.quiet)

    def write_log(self) -> None:
        if self.main:
            atomic.write_json(os.path.join(self.path, LOG_FILE), self.log)

    def save(self, trainer: Trainer, step: int) -> None:
        state = {
            "step": step,
            "micro_batches": step * self.opts.grad_accum,
            "best_loss": None if math.isinf(self.best_loss) else self.best_loss,
            "best_step": self.best_step,
            "run_id": self.run_id,
        }
        with self._saving(CHECKPOINTS_DIR, step):
            self.checkpoints.save(
                step,
                args=ocp.args.Composite(
                    adapters=ocp.args.StandardSave(trainer.adapters),
                    opt_state=ocp.args.StandardSave(trainer.opt_state),
                    state=ocp.args.JsonSave(state),
                ),
            )
        self.write_log()

    @contextlib.contextmanager
    def _saving(self, folder: str, step: int) -> Iterator[None]:
        """An orbax save of update ``step`` into ``folder``: on failure its temporary folder is
        removed and the error becomes one sentence naming the folder (a full disk, say)."""
        where = os.path.join(self.path, folder, str(step))
        try:
            with checkpoint.orbax_errors(where):
                yield
        except Exception as error:
            if self.main:
                for stale in glob.glob(os.path.join(self.path, folder, _ORBAX_TMP)):
                    shutil.rmtree(stale, ignore_errors=True)
            if isinstance(error, OSError):
                raise
            raise ValueError(
                f"{where}: the checkpoint could not be written ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:300]})"
            ) from None

    def save_best(self, trainer: Trainer, step: int, loss: float) -> None:
        self.best_loss, self.best_step = loss, step
        with self._saving(BEST_DIR, step):
            self.best.save(
                step,
                args=ocp.args.Composite(
                    adapters=ocp.args.StandardSave(trainer.adapters),
                    state=ocp.args.JsonSave(
                        {"step": step, "eval_loss": loss, "run_id": self.run_id}
                    ),
                ),
            )

    def restore(self, trainer: Trainer) -> int:
        """Load the latest checkpoint into ``trainer``; returns its update count."""
        step = self.checkpoints.latest_step()
        for later in [s for s in self.best.all_steps() if step is None or s > step]:
            self.best.delete(later)
        if step is None:
            return 0
        target = trainer.abstract_state()
        restored = self.checkpoints.restore(
            step,
            args=ocp.args.Composite(
                adapters=ocp.args.StandardRestore(target["adapters"]),
                opt_state=ocp.args.StandardRestore(target["opt_state"]),
                state=ocp.args.JsonRestore(),
            ),
        )
        state = restored.state
        if state.get("run_id") != self.run_id:
            raise ValueError(
                f"--resume: {self.path}/{CHECKPOINTS_DIR}/{step} was written by another run "
                f"(run {state.get('run_id')}, not {self.run_id} of {RUN_FILE}); remove it or "
                "start afresh in another output path"
            )
        trainer.load_state({"adapters": restored.adapters, "opt_state": restored.opt_state})
        if state["micro_batches"] != step * self.opts.grad_accum:
            raise ValueError(f"{self.path}: checkpoint {step} has an inconsistent data position")
        self.best_loss = math.inf if state["best_loss"] is None else state["best_loss"]
        self.best_step = state["best_step"]
        self.log = atomic.read_json(os.path.join(self.path, LOG_FILE))
        self._truncate(step)
        return step

    def _truncate(self, step: int) -> None:
        self.log = {k: [e for e in v if e["step"] <= step] for k, v in self.log.items()}

    def close(self) -> None:
        self.checkpoints.close()
        self.best.close()


def _evaluate(run: _Run, trainer: Trainer, data: _Data, step: int) -> None:
    loss, targets = trainer.evaluate(data.heldout)
    better = loss < run.best_loss
    if better:
        run.save_best(trainer, step, loss)
    run.log["evals"].append(
        {"step": step, "loss": loss, "ppl": math.exp(loss), "targets": targets, "best": better}
    )
    run.write_log()
    run.say(
        f"step {step}: held-out loss {loss:.4f} (ppl {math.exp(loss):.3f}, {targets:,} targets)"
        + (", best so far" if better else "")
    )


def finetune(opts: FinetuneOptions, flags_text: str | None = None) -> dict[str, Any]:
    """Run (or resume) the fine-tuning job; returns a summary (steps, first and best held-out
    loss, the best update, compilations and, with ``--merge``, the merged checkpoint).

    The run owns ``--output_path`` (``ownership.lock``) from start to end: a second run on the
    same folder is refused while this one lives."""
    folder = job.JobFolder(opts.output_path)
    folder.check()
    with folder.owned():
        return _finetune(opts, flags_text)


def _finetune(opts: FinetuneOptions, flags_text: str | None) -> dict[str, Any]:
    check_options(opts)
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_shape(opts.mesh_shape, candidates=False))
    local = model_loader.resolve_model(opts.model_path)
    tokenizer = model_loader.load_tokenizer(local)
    data = _load_data(opts, tokenizer)
    run = _Run(opts)
    run.say(
        f"data: {data.kind} from {opts.data}: {data.train_examples:,} training and "
        f"{data.heldout_examples:,} held-out examples ({data.dropped} without targets dropped), "
        f"{data.stream.per_epoch} micro-batches of {opts.micro_batch_size} per epoch, "
        f"{data.total_steps} updates of {opts.grad_accum} micro-batches"
    )
    schedule = make_schedule(opts.learning_rate, data.total_steps, opts.warmup_steps, opts.schedule)
    optimizer = make_optimizer(schedule, opts.weight_decay, opts.max_grad_norm)
    model = model_loader.load_model(
        local, COMPUTE_DTYPES[opts.dtype], functools.partial(mesh_lib.param_sharding, mesh)
    )
    adapters = lora.add_adapters(model, opts.lora_config(), opts.seed)
    trainer = Trainer(model, optimizer, mesh, seed=opts.seed, token_chunk=opts.token_chunk)
    trained = sum(x.size for x in jax.tree.leaves(trainer.adapters))
    run.say(f"model {opts.model_path}: {adapters} adapters, {trained:,} trained parameters")

    try:
        start = run.restore(trainer) if opts.resume else 0
        job.JobFolder(run.path).write_flags(flags_text)  # once the run is accepted
        if not opts.resume and run.main:
            atomic.write_json(
                os.path.join(run.path, RUN_FILE),
                {
                    "options": opts.identity(),
                    "run_id": run.run_id,
                    "total_steps": data.total_steps,
                    "train_examples": data.train_examples,
                    "heldout_examples": data.heldout_examples,
                },
            )
        if start == 0 and data.heldout:
            _evaluate(run, trainer, data, 0)
        _train(run, trainer, data, schedule, start)
    finally:
        run.close()
    summary: dict[str, Any] = {
        "steps": data.total_steps,
        "train_loss": run.log["steps"][-1]["loss"] if run.log["steps"] else None,
        "initial_eval_loss": run.log["evals"][0]["loss"] if run.log["evals"] else None,
        "best_eval_loss": None if math.isinf(run.best_loss) else run.best_loss,
        "best_step": run.best_step,
        "compiles": trainer.compiles,
    }
    if opts.merge:
        summary["merged"] = merge(opts)
        run.say(f"merged adapters into {summary['merged']}")
    return summary


def _train(
    run: _Run,
    trainer: Trainer,
    data: _Data,
    schedule: Callable[[int], Any],
    start: int,
) -> None:
    """Updates ``start + 1 .. total``: log, progress line, held-out loss, checkpoints."""
    opts, total = run.opts, data.total_steps
    if start == total:
        run.say(f"the run already finished its {total} updates")
    t0 = time.perf_counter()
    window_tokens, window_seconds = 0, 0.0  # tokens/s counts the updates only
    for step in range(start, total):
        begin = time.perf_counter()
        first = step * opts.grad_accum
        result = trainer.step([data.stream.batch(first + i) for i in range(opts.grad_accum)], step)
        done, now, lr = step + 1, time.perf_counter(), float(schedule(step))
        window_tokens += result.tokens
        window_seconds += now - begin
        run.log["steps"].append(
            {
                "step": done,
                "loss": result.loss,
                "lr": lr,
                "targets": result.targets,
                "tokens": result.tokens,
                "seconds": now - t0,
            }
        )
        if opts.log_every and (done % opts.log_every == 0 or done == total):
            eta = (now - t0) / (done - start) * (total - done)
            run.progress(
                f"step {done}/{total}: loss {result.loss:.4f}, lr {lr:.2e}, "
                f"{window_tokens / window_seconds:,.0f} tokens/s, elapsed {clock(now - t0)}, "
                f"ETA {clock(eta)}"
            )
            window_tokens, window_seconds = 0, 0.0
            run.write_log()
        if data.heldout and ((opts.eval_every and done % opts.eval_every == 0) or done == total):
            _evaluate(run, trainer, data, done)
        if (opts.save_every and done % opts.save_every == 0) or done == total:
            run.save(trainer, done)
    run.write_log()


def merge(opts: FinetuneOptions) -> str:
    """Fold the run's best adapters (or, without held-out data, its last) into a fresh copy of
    the base in ``--merge_dtype`` and save our checkpoint to ``<output_path>/merged``; returns
    its path."""
    path = os.path.abspath(opts.output_path)
    out = os.path.join(path, MERGED_DIR)
    source = None
    for folder in (BEST_DIR, CHECKPOINTS_DIR):
        manager = ocp.CheckpointManager(os.path.join(path, folder))
        if manager.latest_step() is not None:
            source = (folder, manager)
            break
        manager.close()
    if source is None:
        raise FileNotFoundError(f"{path}: no adapters to merge (no {BEST_DIR}/ or checkpoints)")
    folder, manager = source
    step = manager.latest_step()
    local = model_loader.resolve_model(opts.model_path)
    model = model_loader.load_model(local, COMPUTE_DTYPES[opts.merge_dtype])
    lora.add_adapters(model, opts.lora_config(), opts.seed)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        nnx.state(model, lora.LoraParam),
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore(target), state=ocp.args.JsonRestore()
        ),
    )
    manager.close()
    nnx.update(model, restored.adapters)
    lora.merge(model)
    provenance = {
        "base_model": opts.model_path,
        "adapters": os.path.join(folder, str(step)),
        "step": step,
        "eval_loss": restored.state.get("eval_loss"),
        "lora": dataclasses.asdict(opts.lora_config()),
    }
    tokenizer = model_loader.load_tokenizer(local)
    checkpoint.save(out, model, extra={"recovery.json": provenance}, tokenizer=tokenizer)
    return out
