"""Issue 17: loaders refuse what they do not understand, caches cannot go stale, writes never
replace their own input or a finished search."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from multipruner_jax.exporting import export
from multipruner_jax.prune import pipeline
from multipruner_jax.storage import data, hf_io, pruning_config, remote_code

_opts = tiny_models.prune_options


@pytest.fixture(scope="module")
def small_run(tiny_model_dir, tmp_path_factory):
    """A finished 5 % search."""
    out = tmp_path_factory.mktemp("small_run")
    pipeline.run(_opts(tiny_model_dir, out, target_ratio=5.0))
    return out


@pytest.fixture(scope="module")
def compact(small_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compact") / "hf"
    export.export_checkpoint(str(small_run), str(out))
    return out


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


# -- loaders -----------------------------------------------------------------------------------


def test_a_pruning_config_that_disagrees_with_multipruner_layers_is_refused(compact, tmp_path):
    case = tmp_path / "hf"
    shutil.copytree(compact, case)
    config = json.loads((case / pruning_config.FILE).read_text())
    kept = [i for i in range(4) if i not in config["pruned_attn_idx"]]
    config["pruned_attn_idx"] = [*config["pruned_attn_idx"], kept[0]]
    (case / pruning_config.FILE).write_text(json.dumps(config))
    with pytest.raises(
        hf_io.WeightsError, match=f"describe different models .first at layer {kept[0]}"
    ):
        hf_io.load_model(str(case))
    # With both descriptions changed alike, the block's tensors are left over: refused too.
    _edit_json(
        case / "config.json",
        lambda c: c[remote_code.LAYERS_KEY][kept[0]].update(
            num_attention_heads=0, num_key_value_heads=0
        ),
    )
    with pytest.raises(hf_io.WeightsError, match=rf"model.layers.{kept[0]}.self_attn.k_proj"):
        hf_io.load_model(str(case))


def test_a_compact_export_without_its_pruning_config_is_one_sentence(compact, tmp_path):
    case = tmp_path / "hf"
    shutil.copytree(compact, case)
    (case / pruning_config.FILE).unlink()
    with pytest.raises(hf_io.WeightsError, match="pruning_config.json is missing"):
        hf_io.load_model(str(case))


def test_weights_of_more_layers_than_the_config_are_refused(tiny_model_dir, tmp_path):
    case = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, case)
    _edit_json(case / "config.json", lambda c: c.update(num_hidden_layers=2))
    with pytest.raises(hf_io.WeightsError, match=r"tensors are not parameters .*model.layers.2"):
        hf_io.load_model(str(case))
    with pytest.raises(hf_io.WeightsError, match="tensors are not parameters"):
        pipeline.run(_opts(str(case), tmp_path / "out", target_ratio=5.0))
    assert not (tmp_path / "out").exists()


# -- the token cache ---------------------------------------------------------------------------


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "pool.txt"
    path.write_text("\n\n".join(f"Record number {i} says {i * i} and more." for i in range(60)))
    return path


def _tokenizer(path: Path, corpus: list[str]):
    from transformers import AutoTokenizer

    tiny_models.tiny_tokenizer(str(path), corpus, vocab_size=280)
    return AutoTokenizer.from_pretrained(str(path))


def test_a_tokenizer_changed_in_place_is_a_cache_miss(tmp_path, text):
    cache, tok_dir = str(tmp_path / "cache"), tmp_path / "tok"
    first = _tokenizer(tok_dir, [text.read_text()[::-1]])
    cached = data.evaluation_windows(str(text), first, 16, cache_dir=cache)
    second = _tokenizer(tok_dir, [text.read_text()])  # same path, class and size
    assert len(second) == len(first) and second.name_or_path == first.name_or_path
    fresh = data.evaluation_windows(str(text), second, 16)
    assert not np.array_equal(cached[: len(fresh)], fresh[: len(cached)])
    np.testing.assert_array_equal(
        data.evaluation_windows(str(text), second, 16, cache_dir=cache), fresh
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: np.save(p, np.zeros((3, 8), np.int32)),  # wrong shape
        lambda p: np.save(p, np.zeros((3, 16), np.int64)),  # wrong dtype
        lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated
        lambda p: p.write_bytes(b"not a numpy file"),
    ],
)
def test_a_damaged_cache_file_is_rebuilt(tmp_path, text, damage, caplog):
    cache = tmp_path / "cache"
    tok = _tokenizer(tmp_path / "tok", [text.read_text()])
    fresh = data.evaluation_windows(str(text), tok, 16, cache_dir=str(cache))
    (cached,) = cache.glob("*.npy")
    damage(cached)
    with caplog.at_level(logging.WARNING):
        again = data.evaluation_windows(str(text), tok, 16, cache_dir=str(cache))
    np.testing.assert_array_equal(again, fresh)
    assert str(cached) in caplog.text and "rebuilding it" in caplog.text
    np.testing.assert_array_equal(np.load(cached), fresh)


# -- overwrite paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "checkpoint", "checkpoint/inner", ".."])
def test_an_export_never_replaces_the_search_it_exports(small_run, where):
    out = os.path.normpath(os.path.join(small_run, where))
    before = sorted(os.listdir(small_run))
    with pytest.raises(ValueError, match="would replace the checkpoint it exports"):
        export.export_checkpoint(str(small_run), out, overwrite=True)
    assert sorted(os.listdir(small_run)) == before


def test_export_hf_never_replaces_the_source_model(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="would replace the model it is pruned from"):
        pipeline.check_options(
            _opts(
                tiny_model_dir,
                tmp_path / "out",
                export_hf=tiny_model_dir,
                export_overwrite=True,
            )
        )


def test_a_config_is_never_applied_over_a_finished_search(small_run, tiny_model_dir):
    before = (small_run / "checkpoint" / "spec.json").read_text()
    with pytest.raises(ValueError, match="holds a search"):
        pipeline.run(
            _opts(
                tiny_model_dir,
                small_run,
                pruned_model_config_file=str(small_run / pruning_config.FILE),
            )
        )
    assert (small_run / "checkpoint" / "spec.json").read_text() == before


# -- remote code -------------------------------------------------------------------------------


def test_generate_runs_only_our_own_modeling_file_unless_asked(compact, tmp_path):
    from multipruner_jax.exporting import generation

    assert generation.runs_our_code_only(str(compact))
    case = tmp_path / "hf"
    shutil.copytree(compact, case)
    with open(case / "modeling_multipruner.py", "a") as f:
        f.write("\nimport os  # anything at all\n")
    assert not generation.runs_our_code_only(str(case))
    with pytest.raises(ValueError, match="pass --trust_remote_code to run it"):
        generation.greedy_continuation(str(case), "Hello", 2)
    (case / "modeling_multipruner.py").unlink()
    (case / "extra.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="holds Python code other than our modeling file"):
        generation.greedy_continuation(str(case), "Hello", 2)


# -- messages and warnings ---------------------------------------------------------------------


def test_seqlen_above_the_models_positions_is_warned_about(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        pipeline.check_options(_opts(tiny_model_dir, tmp_path / "out", seqlen=256))
    assert "--seqlen=256 is above the model's max_position_embeddings (128)" in caplog.text


def test_a_model_folder_without_tokenizer_files_is_named(tiny_model_dir, tmp_path):
    from multipruner_jax.storage import model_loader

    case = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, case, ignore=shutil.ignore_patterns("tokenizer*", "special*"))
    with pytest.raises(FileNotFoundError, match=f"{case} has no tokenizer"):
        model_loader.load_tokenizer(str(case))


def test_fine_tuning_data_errors_name_the_file(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from multipruner_jax.finetune import finetune_data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\xff\xfe broken")
    with pytest.raises(ValueError, match=rf"--data={bad}:\d+: not UTF-8 text"):
        finetune_data.load_examples(str(bad), tok, 16)
    bad_records = tmp_path / "bad.jsonl"
    bad_records.write_bytes(b'{"instruction": "\xff", "output": "x"}\n')
    with pytest.raises(ValueError, match=rf"--data={bad_records}:\d+: not UTF-8 text"):
        finetune_data.load_examples(str(bad_records), tok, 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"--data={empty}: holds no records"):
        finetune_data.load_examples(str(empty), tok, 16)


def test_a_damaged_options_block_is_named(small_run, tiny_model_dir, tmp_path):
    case = tmp_path / "run"
    shutil.copytree(small_run, case)
    _edit_json(case / pipeline.STATE_FILE, lambda s: s["options"].pop("mlp_channel_group_size"))
    with pytest.raises(ValueError, match="options block lacks mlp_channel_group_size"):
        pipeline.check_options(_opts(tiny_model_dir, case, target_ratio=5.0, resume=True))


def test_the_table_names_a_local_perplexity_set(tmp_path):
    from multipruner_jax.evals import zeroshot

    row = {"model": "m", "params": 10, "perplexity": 12.5}
    assert "wikitext2" in zeroshot.format_row({**row, "dataset": "wikitext2"})
    local = zeroshot.format_row({**row, "dataset": str(tmp_path / "sotu")})
    assert "wikitext2" not in local and "ppl " in local.splitlines()[0]


def test_symlinked_or_file_outputs_are_refused_before_any_work(small_run, tmp_path):
    from multipruner_jax.finetune import recovery

    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(ValueError, match="--out=.*link is a symbolic link"):
        export.export_checkpoint(str(small_run), str(tmp_path / "link"), overwrite=True)
    assert os.listdir(tmp_path / "target") == []
    (tmp_path / "file").write_text("x")
    options = recovery.FinetuneOptions(
        model_path=str(small_run), output_path=str(tmp_path / "file")
    )
    with pytest.raises(ValueError, match="file exists and is not a directory"):
        recovery.finetune(options)


def test_non_finite_weights_are_one_sentence(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    case = tmp_path / "hf"
    shutil.copytree(tiny_model_dir, case)
    tensors = load_file(str(case / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.inf
    save_file(tensors, str(case / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf_io.WeightsError, match=f"tensor {name} holds non-finite values"):
        hf_io.load_model(str(case))


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_loading(tiny_model_dir, tmp_path):
    """Ids past the embedding gather no row (JAX fills NaN): before, the search ended in
    "block step 0: no candidate has a finite score" with a traceback."""
    model = tmp_path / "model"
    tiny_models.save_hf_model(str(model), "llama_gqa", vocab_size=97)
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tiny_model_dir, name), model)
    message = (
        f"{model}: the tokenizer has 300 tokens but the model in {model} has vocab_size 97; "
        "expected the model's own tokenizer"
    )
    with pytest.raises(ValueError, match=message):
        pipeline.run(_opts(str(model), tmp_path / "out", target_ratio=5.0))
    assert not (tmp_path / "out").exists()


def test_a_model_whose_every_candidate_overflows_is_one_sentence(tiny_model_dir, tmp_path):
    """Finite weights whose logits overflow every perplexity (an lm_head scaled by 1e30) end
    the search in one sentence naming the cause (before: a FloatingPointError traceback)."""
    import torch

    model = tmp_path / "model"
    hf = tiny_models.hf_model("llama_mha", vocab_size=300)
    with torch.no_grad():
        hf.lm_head.weight.mul_(1e30)
    hf.save_pretrained(model)
    for name in os.listdir(tiny_model_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tiny_model_dir, name), model)
    with pytest.raises(ValueError, match="block step 0: no candidate has a finite calibration"):
        pipeline.run(_opts(str(model), tmp_path / "out", target_ratio=5.0))
