"""Prune a decoder LLM with MultiPruner: ``python scripts/prune.py --flagfile=configs/X.flags``."""

from absl import flags

from multipruner_jax import agreement, cli, export, hf_io, mesh, pipeline, scoring

_D = pipeline.PruneOptions
flags.DEFINE_string("model_path", None, "HF model directory or Hub id 'org/name'.", required=True)
flags.DEFINE_string("output_path", None, "Output folder (see README).", required=True)
flags.DEFINE_bool(
    "weight_reorder", _D.weight_reorder, "Reorder MLP channels and heads/KV groups by magnitude."
)
flags.DEFINE_float("target_ratio", _D.target_ratio, "Percent of all parameters to remove.")
flags.DEFINE_string(
    "pruning_distribution", _D.pruning_distribution, "Shares 'a:b:c' of blocks:MLP:heads."
)
flags.DEFINE_integer(
    "mlp_channel_group_size", _D.mlp_channel_group_size, "MLP channels removed per step."
)
flags.DEFINE_integer(
    "attn_channel_group_size",
    _D.attn_channel_group_size,
    "Query channels removed per step (whole KV groups).",
)
flags.DEFINE_string(
    "calibration_dataset",
    _D.calibration_dataset,
    "alpaca|wikitext2|c4|ptb, or a local .txt/.jsonl file, folder of .txt, or Arrow folder.",
)
flags.DEFINE_integer(
    "num_calibration_samples_block",
    _D.num_calibration_samples_block,
    "Records drawn for the block stage.",
)
flags.DEFINE_integer(
    "num_calibration_samples_width",
    _D.num_calibration_samples_width,
    "Records drawn for the MLP-width and head stages.",
)
flags.DEFINE_integer("seqlen", _D.seqlen, "Tokens per calibration/evaluation row.")
flags.DEFINE_integer("seed", _D.seed, "Sampling seed for the calibration subsets.")
flags.DEFINE_string(
    "pruned_model_config_file", None, "Apply this pruning_config.json instead of searching."
)
flags.DEFINE_enum("dtype", _D.dtype, list(hf_io.COMPUTE_DTYPES), "Parameter and compute dtype.")
flags.DEFINE_string(
    "mesh_shape", _D.mesh_shape, "'data,model' or 'candidate,data,model'; default all on data."
)
flags.DEFINE_integer("batch_size", _D.batch_size, "Rows per scoring batch; 0 = one per device.")
flags.DEFINE_enum(
    "scoring_mode", _D.scoring_mode, list(scoring.MODES), "Per-layer programs or one whole jit."
)
flags.DEFINE_bool("prefix_cache", _D.prefix_cache, "Reuse cached layer inputs below a candidate.")
flags.DEFINE_bool("bound", _D.bound, "Stop scoring candidates that provably cannot win.")
flags.DEFINE_integer("token_chunk", _D.token_chunk, "Positions per fp32 logits chunk.")
flags.DEFINE_bool("resume", _D.resume, "Continue the search saved in --output_path.")
flags.DEFINE_string(
    "eval_dataset", _D.eval_dataset, "Perplexity set reported before and after (wikitext2 or path)."
)
flags.DEFINE_integer("eval_windows", _D.eval_windows, "Evaluation rows: 0 none, -1 all, N first.")
flags.DEFINE_string("cache_dir", None, "Token-window cache folder (default: no cache).")
flags.DEFINE_string("export_hf", None, "Also export the pruned model to this folder.")
flags.DEFINE_enum(
    "export_format",
    _D.export_format,
    list(export.FORMATS),
    "Format of --export_hf: " + "; ".join(f"{k}: {f.summary}" for k, f in export.FORMATS.items()),
)
flags.DEFINE_enum(
    "export_dtype",
    _D.export_dtype,
    list(export.DTYPES),
    "Tensor dtype of --export_hf (q8_0: gguf).",
)
flags.DEFINE_bool("export_overwrite", _D.export_overwrite, "Replace a non-empty --export_hf.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed) first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto on Cloud TPU).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (auto on Cloud TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (auto on Cloud TPU).")
flags.DEFINE_integer("coordinator_timeout", 120, "Seconds to reach the coordinator or a peer.")
flags.DEFINE_bool("quiet", _D.quiet, "No progress output.")

FLAGS = flags.FLAGS


def main() -> None:
    if FLAGS.distributed:
        mesh.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.coordinator_timeout,
        )
    opts, flags_text = cli.options_from_flags(pipeline.PruneOptions, __name__)
    with mesh.leave_on_error():
        agreement.check_same_options(opts)
        pipeline.run(opts, flags_text=flags_text)


if __name__ == "__main__":
    cli.run(main)
