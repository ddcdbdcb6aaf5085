"""LoRA recovery fine-tuning of a pruned model: ``python scripts/finetune.py --flagfile=F``.

Trains float32 LoRA adapters on instruction records or plain text, resumable (``--resume``),
and with ``--merge`` folds the best adapters into a checkpoint that ``scripts/evaluate.py`` and
``scripts/export_hf.py`` read. See ``multipruner_jax/recovery.py`` for the output layout.
"""

from absl import flags

from multipruner_jax import agreement, cli, hf_io, mesh, recovery

_D = recovery.FinetuneOptions
flags.DEFINE_string("model_path", None, "Pruned checkpoint or HF directory.", required=True)
flags.DEFINE_string("output_path", None, "Output directory.", required=True)
flags.DEFINE_string(
    "data",
    _D.data,
    "Alpaca .json/.jsonl, .txt file, folder or glob of .txt, or a hub dataset id.",
)
flags.DEFINE_integer("eval_examples", _D.eval_examples, "Held-out records or text rows (seed).")
flags.DEFINE_integer("max_len", _D.max_len, "Tokens per example (records are truncated).")
flags.DEFINE_integer("buckets", _D.buckets, "Row lengths compiled (length bucketing).")
flags.DEFINE_integer("micro_batch_size", _D.micro_batch_size, "Rows per micro-batch.")
flags.DEFINE_integer("grad_accum", _D.grad_accum, "Micro-batches per update.")
flags.DEFINE_integer("max_steps", _D.max_steps, "Updates; 0 = --epochs over the data.")
flags.DEFINE_float("epochs", _D.epochs, "Epochs when --max_steps=0.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak AdamW learning rate.")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warm-up updates.")
flags.DEFINE_enum("schedule", _D.schedule, list(recovery.SCHEDULES), "Decay after warm-up.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay.")
flags.DEFINE_float("max_grad_norm", _D.max_grad_norm, "Global-norm clip; 0 = none.")
flags.DEFINE_integer("lora_rank", _D.lora_rank, "Adapter rank r.")
flags.DEFINE_float("lora_alpha", _D.lora_alpha, "Adapter alpha (scale alpha / r).")
flags.DEFINE_float("lora_dropout", _D.lora_dropout, "Dropout on the adapter input.")
flags.DEFINE_string("lora_targets", _D.lora_targets, "Comma list of q,k,v,o,gate,up,down.")
flags.DEFINE_enum("dtype", _D.dtype, list(hf_io.COMPUTE_DTYPES), "Base weights and compute dtype.")
flags.DEFINE_string("mesh_shape", _D.mesh_shape, "'data,model' device mesh; default all on data.")
flags.DEFINE_integer("token_chunk", _D.token_chunk, "Positions per fp32 logits chunk.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Held-out loss every N updates; 0 = at the end.")
flags.DEFINE_integer("save_every", _D.save_every, "Checkpoint every N updates; 0 = at the end.")
flags.DEFINE_integer("log_every", _D.log_every, "Progress line every N updates; 0 = none.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the split, data order, adapters and dropout.")
flags.DEFINE_bool("resume", _D.resume, "Continue the run saved in --output_path.")
flags.DEFINE_bool("merge", _D.merge, "Fold the best adapters into <output_path>/merged.")
flags.DEFINE_enum(
    "merge_dtype", _D.merge_dtype, list(hf_io.COMPUTE_DTYPES), "Merged weights dtype."
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU).")
flags.DEFINE_bool("quiet", _D.quiet, "No progress output.")

FLAGS = flags.FLAGS


def main() -> None:
    if FLAGS.distributed:
        mesh.initialize_distributed()
    opts, flags_text = cli.options_from_flags(recovery.FinetuneOptions, __name__)
    with mesh.leave_on_error():
        agreement.check_same_options(opts)
        summary = recovery.finetune(opts, flags_text=flags_text)
    if not opts.quiet:
        print(
            f"fine-tuned {summary['steps']} updates: held-out loss {summary['initial_eval_loss']}"
            f" -> best {summary['best_eval_loss']} (update {summary['best_step']})"
            + (f"; merged checkpoint {summary['merged']}" if "merged" in summary else "")
        )


if __name__ == "__main__":
    cli.run(main)
