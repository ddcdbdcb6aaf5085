"""Draw a prune run (or several, compared) as an SVG and a PNG.

``python scripts/report.py --run=out/smollm2_mp20 [--run=out/smollm2_block20 ...] [--out=PATH]``
"""

import os

from absl import flags

from multipruner_jax.base import cli
from multipruner_jax.prune import report

flags.DEFINE_multi_string("run", None, "A prune.py output folder; repeat to compare runs.")
flags.DEFINE_string(
    "out",
    None,
    "Picture path without extension (writes .svg and .png); default RUN/report for one run, "
    "required for several.",
)
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.run:
        raise ValueError("--run is required: a prune.py output folder (repeat to compare runs)")
    if len(FLAGS.run) > 1 and not FLAGS.out:
        raise ValueError("--out is required with several --run folders (a path without extension)")
    runs = [report.load_run(path) for path in FLAGS.run]
    out = FLAGS.out or os.path.join(FLAGS.run[0], "report")
    for path in report.draw(runs, out):
        print(path)


if __name__ == "__main__":
    cli.run(main)
