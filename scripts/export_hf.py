"""Export a pruned checkpoint to a PyTorch HF directory.

``python scripts/export_hf.py --checkpoint=OUT/checkpoint --out=DIR [--format=compact|padded]``

``compact`` (default) has the pruned shapes, ``pruning_config.json`` and its own modeling file:
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it, smaller and
faster. ``padded`` has the dense shapes with pruned units zero, for engines that cannot run
remote code (no size or speed benefit).
"""

from absl import flags

from multipruner_jax import cli, export

flags.DEFINE_string(
    "checkpoint", None, "Pruned checkpoint (or the prune output folder holding it).", required=True
)
flags.DEFINE_string("out", None, "Output HF directory.", required=True)
flags.DEFINE_enum(
    "format",
    "compact",
    list(export.FORMATS),
    "compact: pruned shapes (trust_remote_code=True); padded: dense shapes, stock classes.",
)
flags.DEFINE_enum("dtype", "float32", list(export.DTYPES), "Tensor dtype in the files.")
flags.DEFINE_float(
    "max_shard_gb", export.DEFAULT_MAX_SHARD_BYTES / 1e9, "Largest safetensors file (1e9 bytes)."
)
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")

FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.max_shard_gb > 0:
        raise ValueError(f"--max_shard_gb={FLAGS.max_shard_gb:g}: expected a positive size")
    export.export_checkpoint(
        FLAGS.checkpoint,
        FLAGS.out,
        fmt=FLAGS.format,
        dtype=FLAGS.dtype,
        max_shard_bytes=int(FLAGS.max_shard_gb * 1e9),
        overwrite=FLAGS.overwrite,
    )
    print(f"wrote {FLAGS.format} {FLAGS.dtype} HF model to {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
