"""Calibration / evaluation text -> token windows, checked against direct computations."""

import hashlib
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import SHARED_WIKITEXT2
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from multipruner_jax.finetune import finetune_data
from multipruner_jax.storage import assets, data, records


@pytest.fixture(scope="module")
def tokenizer():
    assets.prepare_assets()
    return AutoTokenizer.from_pretrained(assets.smollm2_dir())


@pytest.fixture
def numbered_txt(tmp_path) -> Path:
    """A .txt source of 100 distinct paragraphs."""
    path = tmp_path / "pool.txt"
    path.write_text("\n\n".join(f"Record number {i} says {i * i}." for i in range(100)))
    return path


def _reference_sample(n: int, num_width: int, num_block: int, seed: int) -> tuple[list, list]:
    """The reference: random.seed, then random.sample for width, then for block."""
    state = random.getstate()
    try:
        random.seed(seed)
        return random.sample(range(n), num_width), random.sample(range(n), num_block)
    finally:
        random.setstate(state)


def test_tokenize_windows_is_one_tokenization_cut_into_rows(tokenizer):
    texts = ["The first record.", "A second one, a bit longer than the first.", "Third."] * 5
    windows = data.tokenize_windows(texts, tokenizer, seqlen=16)
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    assert windows.dtype == np.int32
    assert windows.shape == (len(ids) // 16, 16)
    np.testing.assert_array_equal(windows.ravel(), ids[: windows.size])


def test_tokenize_windows_adds_one_bos_at_the_start():
    vocab = {"<s>": 0, "[UNK]": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    windows = data.tokenize_windows(["a b", "b a", "a a"], tokenizer, seqlen=3)
    np.testing.assert_array_equal(windows, [[0, 2, 3], [3, 2, 2]])


def test_tokenize_windows_too_few_tokens(tokenizer):
    count = len(tokenizer("Too short.")["input_ids"])
    with pytest.raises(ValueError, match=f"give {count} tokens, but one window needs 2048"):
        data.tokenize_windows(["Too short."], tokenizer, seqlen=2048)


def test_sampling_matches_reference_random_sample(numbered_txt, tokenizer):
    records = data.load_records(str(numbered_txt))
    width_idx, block_idx = _reference_sample(len(records), 10, 20, seed=42)
    width, block = data.sample_calibration_texts(records, 10, 20, seed=42)
    assert width == [records[i] for i in width_idx]
    assert block == [records[i] for i in block_idx]
    assert width != records[:10]

    width_tokens, block_tokens = data.calibration_windows(
        str(numbered_txt), tokenizer, seqlen=32, num_width=10, num_block=20
    )
    np.testing.assert_array_equal(width_tokens, data.tokenize_windows(width, tokenizer, 32))
    np.testing.assert_array_equal(block_tokens, data.tokenize_windows(block, tokenizer, 32))
    other_seed, _ = data.calibration_windows(
        str(numbered_txt), tokenizer, seqlen=32, num_width=10, num_block=20, seed=0
    )
    assert not np.array_equal(other_seed, width_tokens)


def test_txt_paragraphs_and_folder_order(tmp_path):
    text = "\n\nFirst paragraph\nstill first.\r\n\r\nSecond.\n \t \n\n\nThird.  \n\n  \n"
    (tmp_path / "b.txt").write_text(text)
    (tmp_path / "a.txt").write_text("Alpha one.\n\nAlpha two.")
    (tmp_path / "notes.md").write_text("Not a record.")
    assert data.load_records(str(tmp_path / "b.txt")) == [
        "First paragraph\nstill first.",
        "Second.",
        "Third.",
    ]
    assert data.load_records(str(tmp_path)) == [
        "Alpha one.",
        "Alpha two.",
        "First paragraph\nstill first.",
        "Second.",
        "Third.",
    ]


def test_jsonl_text_and_alpaca_rendering(tmp_path):
    rows = [
        {"text": "Plain text record."},
        {
            "instruction": "Create a classification task by clustering the given list of items.",
            "input": "Apples, oranges, bananas, strawberries, pineapples",
            "output": "Class 1: Apples, Oranges\nClass 2: Bananas, Strawberries\n"
            "Class 3: Pineapples",
        },
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Sleep."},
        {"text": ""},
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert data.load_records(str(path)) == [
        "Plain text record.",
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nCreate a classification task by clustering the given list of items."
        "\n\n### Input:\nApples, oranges, bananas, strawberries, pineapples\n\n### Response:\n"
        "Class 1: Apples, Oranges\nClass 2: Bananas, Strawberries\nClass 3: Pineapples",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n"
        "### Response:\nSleep.",
        "",
    ]
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"pool\.jsonl:2: a record needs a 'text' string"):
        data.load_records(str(path))


def test_arrow_folder(tmp_path):
    datasets.Dataset.from_dict({"text": ["one", "two"], "id": [1, 2]}).save_to_disk(
        tmp_path / "plain"
    )
    assert data.load_records(str(tmp_path / "plain")) == ["one", "two"]
    alpaca = {"instruction": ["Say hi."], "input": [""], "output": ["Hi."]}
    datasets.Dataset.from_dict(alpaca).save_to_disk(tmp_path / "alpaca")
    assert data.load_records(str(tmp_path / "alpaca")) == [data.format_alpaca("Say hi.", "", "Hi.")]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})})
    splits.save_to_disk(tmp_path / "splits")
    with pytest.raises(ValueError, match="several splits"):
        data.load_records(str(tmp_path / "splits"))


def test_source_errors(tmp_path, numbered_txt, tokenizer):
    with pytest.raises(ValueError, match=r"'nowhere\.txt' is unknown: expected one of alpaca"):
        data.load_records("nowhere.txt")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="exists but is not a supported source.*jsonl"):
        data.calibration_windows(str(tmp_path / "table.csv"), tokenizer)
    with pytest.raises(ValueError, match=r"pool\.txt' has 100 records, fewer than the 256"):
        data.calibration_windows(str(numbered_txt), tokenizer, num_width=8, num_block=256)
    with pytest.raises(ValueError, match=r"width set of 3 records: the texts give \d+ tokens"):
        data.calibration_windows(str(numbered_txt), tokenizer, num_width=3, num_block=100)
    with pytest.raises(ValueError, match="expected 'wikitext2' or a local path"):
        data.evaluation_windows("alpaca", tokenizer)
    # conftest switches the hub off: a hub source is refused before anything loads
    with pytest.raises(ValueError, match="'c4' comes from the Hugging Face hub, which is switched"):
        data.check_source("c4")
    data.check_source("wikitext2")  # the local copy in ../shared serves offline


def test_cache_hit_returns_identical_arrays(tmp_path, numbered_txt, tokenizer, monkeypatch):
    cache = str(tmp_path / "cache")
    args = (str(numbered_txt), tokenizer, 32, 10, 20)
    first = data.calibration_windows(*args, cache_dir=cache)
    evaluated = data.evaluation_windows(str(numbered_txt), tokenizer, 32, cache_dir=cache)
    assert len(list(Path(cache).glob("*.npy"))) == 3

    def unreachable(*_args, **_kwargs):
        raise AssertionError("a cache hit must not read the source")

    monkeypatch.setattr(data, "load_records", unreachable)
    second = data.calibration_windows(*args, cache_dir=cache)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == np.int32
    np.testing.assert_array_equal(
        evaluated, data.evaluation_windows(str(numbered_txt), tokenizer, 32, cache_dir=cache)
    )
    numbered_txt.write_text(numbered_txt.read_text() + "\n\nOne more record.")
    with pytest.raises(AssertionError, match="must not read the source"):
        data.calibration_windows(*args, cache_dir=cache)


def test_evaluation_windows_of_a_local_source(numbered_txt, tokenizer):
    windows = data.evaluation_windows(str(numbered_txt), tokenizer, seqlen=64)
    expected = data.tokenize_windows(numbered_txt.read_text().split("\n\n"), tokenizer, 64)
    np.testing.assert_array_equal(windows, expected)


def test_wikitext2_local_split(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = data.load_records("wikitext2")  # $MULTIPRUNER_WIKITEXT2: the copy beside the checkout
    joined = "\n\n".join(rows)
    assert len(rows) == 4358 and rows[0] == ""
    assert len(joined) == 1_294_336
    assert hashlib.sha256(joined.encode()).hexdigest() == data.WIKITEXT2_TEST_SHA256

    # Without the variable, offline: only a copy installed in the assets folder is read.
    monkeypatch.delenv(data.WIKITEXT2_ENV)
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path / "assets"))
    with pytest.raises(FileNotFoundError, match="prepare_assets.py --wikitext2=FILE"):
        data.load_records("wikitext2")
    assert data.install_wikitext2(SHARED_WIKITEXT2).startswith("WikiText-2 test split: ")
    assert data.load_records("wikitext2") == rows

    fake = tmp_path / "wiki.test.rows.jsonl"
    fake.write_text(json.dumps({"text": "not wikitext"}) + "\n")
    with pytest.raises(ValueError, match="is not the wikitext-2-raw-v1 test split"):
        data.load_records("wikitext2", wikitext2_path=str(fake))
    with pytest.raises(ValueError, match="is not the wikitext-2-raw-v1 test split"):
        data.install_wikitext2(fake, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    # A folder holding the rows file is accepted; one without it is refused before anything else.
    line = data.install_wikitext2(Path(SHARED_WIKITEXT2).parent, str(tmp_path / "from_folder"))
    assert line.endswith(f"(from {SHARED_WIKITEXT2})")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no wiki.test.rows.jsonl"):
        data.install_wikitext2(tmp_path / "empty", str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    monkeypatch.setenv(data.WIKITEXT2_ENV, str(fake))
    with pytest.raises(ValueError, match="is not the wikitext-2-raw-v1 test split"):
        data.load_records("wikitext2")


def test_one_reader_names_the_file_for_both_consumers(tmp_path):
    """Calibration and fine-tuning read local files through ``records``: the same line ends and
    the same one-sentence errors, each naming the file (and line)."""
    text = tmp_path / "crlf.txt"
    text.write_bytes(b"one\r\ntwo\rthree\r\n\r\nfour")
    assert data.load_records(str(text)) == ["one\ntwo\nthree", "four"]
    assert finetune_data.read_texts(str(text)) == ["one\ntwo\nthree\n\nfour"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff broken")
    for read in (data.load_records, finetune_data.read_texts):
        with pytest.raises(records.SourceError, match=rf"^{bad}:2: not UTF-8 text \("):
            read(str(bad))
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text(" \n")
        for read in (data.load_records, finetune_data.read_records):
            with pytest.raises(records.SourceError, match=f"{name}: holds no records"):
                read(str(tmp_path / name))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n\n[1]\n')
    with pytest.raises(records.SourceError, match=r"rows\.jsonl:3: expected a JSON object"):
        data.load_records(str(rows))
    listed = tmp_path / "rows.json"
    listed.write_text('[\n {"instruction": "i", "output": "o"},\n {"text": "t"}\n]')
    with pytest.raises(ValueError, match=r"rows\.json:3: .*'instruction', 'output' is missing"):
        finetune_data.read_records(str(listed))


def test_both_consumers_read_json_lists_and_arrow_folders(tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    listed = tmp_path / "pool.json"
    listed.write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "arrow")
    for source in (str(listed), str(tmp_path / "arrow")):
        assert data.load_records(source) == [data.format_alpaca("Say hi.", "", "Hi.")]
        assert finetune_data.source_kind(source) == "records"
        assert finetune_data.read_records(source) == rows
