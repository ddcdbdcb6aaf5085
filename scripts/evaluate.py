"""The paper's row for a model: WikiText-2 perplexity and zero-shot accuracy through
lm-evaluation-harness (``--model_path=...``; HF directory, Hub id, export or our checkpoint).

The evaluation's flags are the fields of ``evaluation.EvalOptions`` (declared there, with their
help); ``--output_json`` is this script's own.
"""

from absl import flags

from multipruner_jax.base import atomic, cli
from multipruner_jax.evals import evaluation, zeroshot

cli.define_flags(evaluation.EvalOptions, __name__)
flags.DEFINE_string("output_json", None, "Also write the result to this JSON file.")
FLAGS = flags.FLAGS


def main() -> None:
    opts, _ = cli.options_from_flags(evaluation.EvalOptions, __name__)
    result = evaluation.evaluate(opts, progress=True)
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
