"""Prepare the offline assets (SmolLM2-135M HF directory, SOTU calibration text); no-op if done.

python scripts/prepare_assets.py --assets_dir=.assets
"""

import time

from absl import flags

from multipruner_jax import assets, cli

_ASSETS_DIR = flags.DEFINE_string(
    "assets_dir", None, f"Assets root; default ${assets.ASSETS_ENV} or .assets in the repository."
)


def main() -> None:
    start = time.perf_counter()
    for line in assets.prepare_assets(_ASSETS_DIR.value):
        print(line)
    print(f"assets ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
