"""LoRA recovery fine-tuning of a pruned model: ``python scripts/finetune.py --flagfile=F``.

Trains float32 LoRA adapters on instruction records or plain text, resumable (``--resume``),
and with ``--merge`` folds the best adapters into a checkpoint that ``scripts/evaluate.py`` and
``scripts/export_hf.py`` read. See ``multipruner_jax/finetune/recovery.py`` for the output layout.
"""

from multipruner_jax.base import cli, mesh
from multipruner_jax.finetune import recovery
from multipruner_jax.storage import agreement

cli.define_flags(recovery.FinetuneOptions, __name__)  # the job's flags, with their help
cli.define_distributed_flags(__name__)


def main() -> None:
    cli.join_if_distributed()
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
