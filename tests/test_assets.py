"""The offline assets: SmolLM2-135M as a loadable HF directory, SOTU calibration text."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from multipruner_jax.storage import assets, data


@pytest.fixture(scope="module")
def root() -> Path:
    assets.prepare_assets()
    return assets.assets_dir()


def test_smollm2_config(root):
    config = AutoConfig.from_pretrained(assets.smollm2_dir(root))
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.hidden_size == 576 and config.intermediate_size == 1536
    assert config.tie_word_embeddings is True
    assert config.vocab_size == 49152


def test_smollm2_model_is_the_pretrained_model(root):
    """Weights load with transformers and give the published-level perplexity on real prose.

    Leaving the GGUF's q/k row permutation in place gives about 300 here instead of about 25.
    """
    directory = assets.smollm2_dir(root)
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = (assets.sotu_dir(root) / "2012_barack_obama_d.txt").read_text(encoding="utf-8")
    ids = torch.tensor([tokenizer(text)["input_ids"][:256]])
    with torch.no_grad():
        perplexity = model(ids, labels=ids).loss.exp().item()
    assert 10 < perplexity < 40


def test_smollm2_tokenizer(root):
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir(root))
    assert len(tokenizer) == 49152
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_sotu_records(root):
    folder = assets.sotu_dir(root)
    assert len(list(folder.glob("*.txt"))) == 233
    records = data.load_records(str(folder))
    assert len(records) > 12_000
    assert records[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert all("\n" not in record for record in records)
    assert sum(len(r) <= 1000 for r in records) > 0.99 * len(records)


def test_split_records_on_sentences():
    text = "Mr. Speaker, the U.S. Army is here.  It  works!\nDoes it? " + "Yes. " * 3
    assert assets.split_records(text, max_chars=40) == [
        "Mr. Speaker, the U.S. Army is here.",
        "It works! Does it? Yes. Yes. Yes.",
    ]
    assert assets.split_records("One very long sentence. Short.", max_chars=5) == [
        "One very long sentence.",
        "Short.",
    ]


def test_second_preparation_is_a_no_op(root, monkeypatch):
    files = [*assets.smollm2_dir(root).iterdir(), *assets.sotu_dir(root).iterdir()]
    before = {f: f.stat().st_mtime_ns for f in files}

    def must_not_build(out: Path) -> None:
        raise AssertionError(f"{out} was rebuilt")

    monkeypatch.setattr(assets, "_build_smollm2", must_not_build)
    monkeypatch.setattr(assets, "_build_sotu", must_not_build)
    lines = assets.prepare_assets(root)
    assert all("already prepared" in line for line in lines)
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def build_model(out: Path) -> None:
        (out / "config.json").write_text("{}")

    def build_text(out: Path) -> None:
        (out / "half.txt").write_text("half written")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(assets, "_build_smollm2", build_model)
    monkeypatch.setattr(assets, "_build_sotu", build_text)
    with pytest.raises(RuntimeError, match="interrupted"):
        assets.prepare_assets(tmp_path)
    assert (assets.smollm2_dir(tmp_path) / "config.json").is_file()
    assert not assets.sotu_dir(tmp_path).exists()
    assert sorted(os.listdir(tmp_path)) == [assets.SMOLLM2_DIR]


def test_assets_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    assert assets.assets_dir() == tmp_path
    assert assets.smollm2_dir() == tmp_path / assets.SMOLLM2_DIR
    monkeypatch.delenv(assets.ASSETS_ENV)
    assert assets.assets_dir() == Path(assets.__file__).resolve().parents[2] / ".assets"
