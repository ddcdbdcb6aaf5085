"""Prune a decoder LLM with MultiPruner: ``python scripts/prune.py --flagfile=configs/X.flags``.

The job's flags are the fields of ``pipeline.PruneOptions`` (declared there, with their help);
the flags defined here only join a multi-process run.
"""

from absl import flags

from multipruner_jax import agreement, cli, mesh, pipeline

cli.define_flags(pipeline.PruneOptions, __name__)
flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed) first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto on Cloud TPU).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (auto on Cloud TPU).")
flags.DEFINE_integer("process_id", None, "This process's index (auto on Cloud TPU).")
flags.DEFINE_integer("coordinator_timeout", 120, "Seconds to reach the coordinator or a peer.")

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
