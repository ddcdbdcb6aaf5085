"""Export a pruned checkpoint for transformers or a serving engine.

``python scripts/export_hf.py --checkpoint=OUT/checkpoint --out=DIR [--format=...] [--dtype=...]``

Formats (``multipruner_jax.exporting.export.FORMATS``): ``compact`` (default; transformers with
``trust_remote_code=True``), ``padded`` (dense shapes, any loader), ``decilm`` (vLLM, SGLang,
TensorRT-LLM, mlx-lm) and ``gguf`` (llama.cpp, Ollama, LM Studio: ``DIR/model.gguf``). The last
line printed says which zeros the format had to add, and where.
"""

from absl import flags

from multipruner_jax.base import cli
from multipruner_jax.exporting import export

flags.DEFINE_string(
    "checkpoint", None, "Pruned checkpoint (or the prune output folder holding it).", required=True
)
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_enum(
    "format",
    "compact",
    list(export.FORMATS),
    "; ".join(f"{name}: {f.summary}" for name, f in export.FORMATS.items()),
)
flags.DEFINE_enum(
    "dtype",
    "float32",
    list(export.DTYPES),
    "Tensor dtype in the files (q8_0: gguf only).",
)
flags.DEFINE_float(
    "max_shard_gb",
    export.DEFAULT_MAX_SHARD_BYTES / 1e9,
    "Largest safetensors file (1e9 bytes); not used by gguf.",
)
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")

FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.max_shard_gb > 0:
        raise ValueError(f"--max_shard_gb={FLAGS.max_shard_gb:g}: expected a positive size")
    report = export.export_checkpoint(
        FLAGS.checkpoint,
        FLAGS.out,
        fmt=FLAGS.format,
        dtype=FLAGS.dtype,
        max_shard_bytes=int(FLAGS.max_shard_gb * 1e9),
        overwrite=FLAGS.overwrite,
    )
    print(f"wrote {FLAGS.format} {FLAGS.dtype} model to {FLAGS.out}")
    print(report)


if __name__ == "__main__":
    cli.run(main)
