"""Prune a decoder LLM with MultiPruner: ``python scripts/prune.py --flagfile=configs/X.flags``.

The job's flags are the fields of ``pipeline.PruneOptions`` (declared there, with their help);
`cli.define_distributed_flags` adds the flags that join a multi-process run.
"""

from multipruner_jax.base import cli, mesh
from multipruner_jax.prune import pipeline
from multipruner_jax.storage import agreement

cli.define_flags(pipeline.PruneOptions, __name__)
cli.define_distributed_flags(__name__)
cli.retire_flag("scoring_mode", "layer", "scoring always runs per-layer programs now")


def main() -> None:
    cli.join_if_distributed()
    opts, flags_text = cli.options_from_flags(pipeline.PruneOptions, __name__)
    with mesh.leave_on_error():
        agreement.check_same_options(opts)
        pipeline.run(opts, flags_text=flags_text)


if __name__ == "__main__":
    cli.run(main)
