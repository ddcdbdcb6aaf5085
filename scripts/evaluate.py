"""WikiText-2 perplexity of an HF model or a pruned checkpoint (``--model_path=...``)."""

from absl import flags

from multipruner_jax import atomic, cli, evaluation, mesh, pipeline

flags.DEFINE_string(
    "model_path",
    None,
    "HF directory (dense or exported), Hub id, our checkpoint or a prune output folder.",
    required=True,
)
flags.DEFINE_string("dataset", "wikitext2", "wikitext2 (test split) or a local text source.")
flags.DEFINE_integer("seqlen", 2048, "Tokens per row.")
flags.DEFINE_integer("windows", 0, "Evaluate the first N rows; 0 = the whole split.")
flags.DEFINE_enum("dtype", "float32", list(pipeline.DTYPES), "Parameter and compute dtype.")
flags.DEFINE_string("mesh_shape", "", "'data,model' device mesh; default all on data.")
flags.DEFINE_integer("batch_size", 0, "Rows per batch; 0 = one per device.")
flags.DEFINE_string("cache_dir", None, "Token-window cache folder (default: no cache).")
flags.DEFINE_string("output_json", None, "Also write the result to this JSON file.")
FLAGS = flags.FLAGS


def main() -> None:
    result = evaluation.evaluate(
        FLAGS.model_path,
        dataset=FLAGS.dataset,
        seqlen=FLAGS.seqlen,
        windows=FLAGS.windows,
        dtype=pipeline.DTYPES[FLAGS.dtype],
        mesh_shape=mesh.parse_mesh_shape(FLAGS.mesh_shape),
        batch_size=FLAGS.batch_size,
        cache_dir=FLAGS.cache_dir,
    )
    print(
        f"{result['model']}: {result['dataset']} perplexity {result['perplexity']:.4f} "
        f"({result['rows']} rows x {result['seqlen']} tokens, {result['params']:,} parameters)"
    )
    if FLAGS.output_json:
        atomic.write_json(FLAGS.output_json, result)


if __name__ == "__main__":
    cli.run(main)
