"""Load an exported HF directory with stock transformers and print a greedy continuation.

``python scripts/generate.py --model_path=out/smollm2_135m_demo/hf --prompt="..."``
"""

from absl import flags

from multipruner_jax.base import cli
from multipruner_jax.exporting import generation

flags.DEFINE_string("model_path", None, "Exported Hugging Face directory.", required=True)
flags.DEFINE_string(
    "prompt", "The history of the United States began", "Text to continue greedily."
)
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate.")
flags.DEFINE_bool(
    "trust_remote_code",
    False,
    "Run the folder's Python code even when it is not our own modeling file.",
)
FLAGS = flags.FLAGS


def main() -> None:
    text = generation.greedy_continuation(
        FLAGS.model_path, FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.trust_remote_code
    )
    print("load it with:\n" + generation.LOAD_SNIPPET.format(path=FLAGS.model_path))
    print(f"greedy continuation ({FLAGS.max_new_tokens} tokens) of {FLAGS.prompt!r}:")
    print(f"  {FLAGS.prompt}{text}")


if __name__ == "__main__":
    cli.run(main)
