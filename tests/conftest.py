"""Test set-up: 8 fake CPU devices before JAX starts, offline hub, highest matmul precision."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The WikiText-2 test split ships with no package; tests read the verified copy beside the
# checkout (the product never does: users install theirs with prepare_assets.py --wikitext2).
SHARED_WIKITEXT2 = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared/data/wikitext-2-raw/wiki.test.rows.jsonl",
)
os.environ.setdefault("MULTIPRUNER_WIKITEXT2", SHARED_WIKITEXT2)
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402
import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random ``llama_gqa`` HF directory with a BPE tokenizer trained on SOTU text."""
    from multipruner_jax.storage import assets, data

    path = str(tmp_path_factory.mktemp("tiny_hf"))
    corpus = data.load_records(str(assets.sotu_dir()))[:400]
    tiny_models.tiny_tokenizer(path, corpus)
    tiny_models.save_hf_model(path, "llama_gqa", vocab_size=300)
    return path
