"""Prepare the offline assets (SmolLM2-135M HF directory, SOTU calibration text); no-op if done.
With --wikitext2, also install a copy of the WikiText-2 test split you have (checked by sha256),
so that evaluation works offline.

python scripts/prepare_assets.py --assets_dir=.assets [--wikitext2=wiki.test.rows.jsonl or folder]
"""

import time

from absl import flags

from multipruner_jax.base import cli
from multipruner_jax.storage import assets, data

_ASSETS_DIR = flags.DEFINE_string(
    "assets_dir", None, f"Assets root; default ${assets.ASSETS_ENV} or .assets in the repository."
)

_WIKITEXT2 = flags.DEFINE_string(
    "wikitext2",
    None,
    'A wiki.test.rows.jsonl of the wikitext-2-raw-v1 test split (one {"text": row} per line, '
    "all 4,358 rows), or a folder holding one, to install for offline evaluation.",
)


def main() -> None:
    start = time.perf_counter()
    if _WIKITEXT2.value:  # first: a wrong file is refused before minutes of other work
        print(data.install_wikitext2(_WIKITEXT2.value, _ASSETS_DIR.value))
    for line in assets.prepare_assets(_ASSETS_DIR.value):
        print(line)
    print(f"assets ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
