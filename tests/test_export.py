"""HF export of pruned models: padded (stock transformers) and compact (our loader) directories."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tiny_models
import torch
import transformers
from flax import nnx

from models.decoder import CausalLM
from models.spec import (
    LayerSpec,
    ModelSpec,
    SpecError,
    count_params,
    dense_spec,
    spec_to_hf_config,
)
from multipruner_jax.base import atomic
from multipruner_jax.exporting import export, tensor_files
from multipruner_jax.prune import surgery
from multipruner_jax.storage import checkpoint, hf_io, pruning_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = list(tiny_models.FAMILIES)  # compact and padded carry every family
TOKENS = tiny_models.tokens(2, 12)
STOCK_TOL = 1e-4
CORPUS = ["the quick brown fox jumps over the lazy dog", "pruning keeps a prefix of units"] * 8


def _heterogeneous(spec: ModelSpec) -> ModelSpec:
    """Layer 0 loses attention, 1 its MLP, 2 one KV group, 3 a third of its MLP channels."""
    kv, width = spec.num_key_value_heads, spec.intermediate_size
    return spec.replace_layers(
        [
            LayerSpec(False, kv, True, width),
            LayerSpec(True, kv, False, width),
            LayerSpec(True, kv - 1, True, width),
            LayerSpec(True, kv, True, width - 32),
        ]
    )


def _pruned(family: str) -> CausalLM:
    dense = tiny_models.model(family)
    return surgery.shrink(dense, _heterogeneous(dense.spec))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.cache
def _cached_logits(family: str) -> np.ndarray:
    return _logits(_pruned(family))


def _logits(model: CausalLM) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(TOKENS)))


def _stock_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _stock_logits(model: transformers.PreTrainedModel) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(TOKENS).long()).logits.numpy()


def _header(file: str) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _weight_files(path) -> dict[str, str]:
    """``{tensor name: file name}`` of an HF directory (single file or index)."""
    index = os.path.join(path, hf_io.INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    header = _header(os.path.join(path, hf_io.SINGLE_FILE))
    return {name: hf_io.SINGLE_FILE for name in header if name != "__metadata__"}


def _entries(path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape, offsets) across the directory's files."""
    files = set(_weight_files(path).values())
    headers = [_header(os.path.join(path, file)) for file in files]
    for header in headers:
        assert header.pop("__metadata__") == {"format": "pt"}
    return {name: entry for header in headers for name, entry in header.items()}


def _shapes(path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(entry["shape"]) for name, entry in _entries(path).items()}


def _weight_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(path, file)) for file in set(_weight_files(path).values())
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_models.tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), CORPUS)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    model: CausalLM
    checkpoint: str
    padded: str
    compact: str


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory, tokenizer) -> Case:
    """A pruned model saved as our checkpoint, then exported in both formats."""
    family = request.param
    model = _pruned(family)
    root = tmp_path_factory.mktemp(family)
    ckpt, padded, compact = (str(root / name) for name in ("checkpoint", "padded", "compact"))
    checkpoint.save(ckpt, model, tokenizer=tokenizer)
    export.export_checkpoint(ckpt, padded, fmt="padded")
    export.export_checkpoint(ckpt, compact)
    return Case(family, model, ckpt, padded, compact)


def test_padded_matches_stock_transformers(case):
    stock = _stock_model(case.padded)
    ours = _cached_logits(case.family)
    assert np.abs(ours).max() > 1.0, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(_stock_logits(stock), ours, rtol=0, atol=STOCK_TOL)
    dense = dense_spec(case.model.spec)
    assert sum(p.numel() for p in stock.parameters()) == count_params(dense)
    config = stock.config
    assert config.num_key_value_heads == dense.num_key_value_heads
    assert config.intermediate_size == dense.intermediate_size
    assert config.tie_word_embeddings == dense.tie_word_embeddings
    assert ("lm_head.weight" in _weight_files(case.padded)) == (not dense.tie_word_embeddings)


def test_padded_tensors_are_zero_exactly_where_pruned(case):
    spec = case.model.spec
    q_kept = (spec.num_key_value_heads - 1) * spec.q_per_kv * spec.head_dim
    kv_kept = (spec.num_key_value_heads - 1) * spec.head_dim
    w_kept = spec.intermediate_size - 32
    state = safetensors.numpy.load_file(os.path.join(case.padded, hf_io.SINGLE_FILE))
    layer = "model.layers.{}.{}.{}"

    def zero(name: str, *index: slice) -> bool:
        return not state[name][index].any()

    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert zero(layer.format(0, "self_attn", f"{proj}.weight"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert zero(layer.format(1, "mlp", f"{proj}.weight"))
    assert zero(layer.format(2, "self_attn", "q_proj.weight"), slice(q_kept, None))
    assert not zero(layer.format(2, "self_attn", "q_proj.weight"), slice(q_kept - 1, None))
    for proj in ("k_proj", "v_proj"):
        assert zero(layer.format(2, "self_attn", f"{proj}.weight"), slice(kv_kept, None))
    assert zero(layer.format(2, "self_attn", "o_proj.weight"), slice(None), slice(q_kept, None))
    for proj in ("gate_proj", "up_proj"):
        assert zero(layer.format(3, "mlp", f"{proj}.weight"), slice(w_kept, None))
    assert zero(layer.format(3, "mlp", "down_proj.weight"), slice(None), slice(w_kept, None))
    if spec.qkv_bias:
        assert zero(layer.format(0, "self_attn", "q_proj.bias"))
        assert zero(layer.format(2, "self_attn", "k_proj.bias"), slice(kv_kept, None))
        assert not zero(layer.format(2, "self_attn", "k_proj.bias"), slice(kv_kept - 1, None))


def test_compact_has_pruned_shapes_and_no_removed_blocks(case):
    spec = case.model.spec
    padded, compact = _shapes(case.padded), _shapes(case.compact)
    removed = ("model.layers.0.self_attn.", "model.layers.1.mlp.")
    assert set(compact) == {name for name in padded if not name.startswith(removed)}
    assert "model.layers.0.input_layernorm.weight" in compact
    assert "model.layers.1.post_attention_layernorm.weight" in compact
    d, hd = spec.hidden_size, spec.head_dim
    kv = spec.num_key_value_heads - 1
    q, k, w = kv * spec.q_per_kv * hd, kv * hd, spec.intermediate_size - 32
    attn, mlp = "model.layers.2.self_attn.", "model.layers.3.mlp."
    expected = {
        f"{attn}q_proj.weight": (q, d),
        f"{attn}k_proj.weight": (k, d),
        f"{attn}v_proj.weight": (k, d),
        f"{attn}o_proj.weight": (d, q),
        f"{mlp}gate_proj.weight": (w, d),
        f"{mlp}up_proj.weight": (w, d),
        f"{mlp}down_proj.weight": (d, w),
    }
    if spec.qkv_bias:
        expected.update({f"{attn}q_proj.bias": (q,), f"{attn}k_proj.bias": (k,)})
        expected[f"{attn}v_proj.bias"] = (k,)
    for name, shape in padded.items():
        if name in compact:
            assert compact[name] == expected.get(name, shape), name
    assert _weight_bytes(case.compact) < _weight_bytes(case.padded)
    with open(os.path.join(case.compact, hf_io.CONFIG_FILE)) as f:
        assert json.load(f)["num_key_value_heads"] == spec.num_key_value_heads
    with open(os.path.join(case.compact, pruning_config.FILE)) as f:
        config = json.load(f)
    unit = spec.q_per_kv * hd
    assert config["pruned_attn_idx"] == [0] and config["pruned_mlp_idx"] == [1]
    assert config["pruned_attn_width"]["2"] == kv * unit
    assert config["pruned_mlp_width"]["3"] == spec.intermediate_size - 32


def test_compact_reloads_with_our_loader(case):
    reloaded = hf_io.load_model(case.compact)
    assert reloaded.spec == case.model.spec
    np.testing.assert_array_equal(_logits(reloaded), _cached_logits(case.family))


def test_tokenizer_is_copied(case, tokenizer):
    for path in (case.padded, case.compact):
        copied = transformers.AutoTokenizer.from_pretrained(path)
        assert copied.encode(CORPUS[0]) == tokenizer.encode(CORPUS[0])


@pytest.mark.parametrize("fmt", ["padded", "compact"])
def test_sharded_export_reloads(fmt, tmp_path):
    model, limit = _pruned("qwen2"), 20_000
    out = str(tmp_path / fmt)
    export.export(model, out, fmt=fmt, max_shard_bytes=limit)
    assert not os.path.exists(os.path.join(out, hf_io.SINGLE_FILE))
    weight_map = _weight_files(out)
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    entries = _entries(out)
    for file in files:
        names = [n for n, f in weight_map.items() if f == file]
        size = sum(entries[n]["data_offsets"][1] - entries[n]["data_offsets"][0] for n in names)
        assert size <= limit or len(names) == 1
    with open(os.path.join(out, hf_io.INDEX_FILE)) as f:
        total = json.load(f)["metadata"]["total_size"]
    assert total == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
    if fmt == "padded":
        np.testing.assert_allclose(
            _stock_logits(_stock_model(out)), _cached_logits("qwen2"), rtol=0, atol=STOCK_TOL
        )
    else:
        np.testing.assert_array_equal(_logits(hf_io.load_model(out)), _cached_logits("qwen2"))


@pytest.mark.parametrize("dtype, code", [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_precision_export(dtype, code, tmp_path):
    model = _pruned("llama_gqa")
    out = str(tmp_path / "half")
    export.export(model, out, fmt="compact", dtype=dtype)
    assert {entry["dtype"] for entry in _entries(out).values()} == {code}
    with open(os.path.join(out, hf_io.CONFIG_FILE)) as f:
        assert json.load(f)["dtype"] == dtype
    reloaded = nnx.to_pure_dict(nnx.state(hf_io.load_model(out)))
    original = nnx.to_pure_dict(nnx.state(model))
    for got, want in zip(jax.tree.leaves(reloaded), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want.astype(dtype), np.float32))


WINDOWED = ["mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize(
    "family, window", [(f, None) for f in FAMILIES] + [(f, 16) for f in WINDOWED]
)
def test_config_loads_in_transformers_and_reads_back(family, window, tmp_path):
    spec = dataclasses.replace(tiny_models.spec(family), sliding_window=window)
    config = spec_to_hf_config(spec)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    stock = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(stock).__name__ == config["architectures"][0].replace("ForCausalLM", "Config")
    assert stock.num_key_value_heads == spec.num_key_value_heads
    assert stock.head_dim == spec.head_dim
    assert stock.tie_word_embeddings == spec.tie_word_embeddings
    assert stock.rope_parameters["rope_type"] == spec.rope.rope_type
    if family in WINDOWED:
        assert stock.sliding_window == window
    if family.startswith("qwen"):
        expected = "sliding_attention" if window else "full_attention"
        assert stock.layer_types == [expected] * spec.num_layers
    assert hf_io.read_spec(str(tmp_path)) == spec


@pytest.mark.parametrize(
    "family, change", [("mistral", dict(qkv_bias=True)), ("llama_gqa", dict(sliding_window=16))]
)
def test_config_refuses_a_spec_its_family_cannot_express(family, change):
    spec = dataclasses.replace(tiny_models.spec(family), **change)
    with pytest.raises(SpecError, match="cannot be written"):
        spec_to_hf_config(spec)


def test_compact_keeps_the_search_order_from_pruning_config(tmp_path, caplog):
    dense = tiny_models.model("qwen3")
    spec = dense.spec.replace_layers(
        [
            dataclasses.replace(layer, has_mlp=i in (0, 2))
            for i, layer in enumerate(dense.spec.layers)
        ]
    )
    run = tmp_path / "run"
    checkpoint.save(str(run / "checkpoint"), surgery.shrink(dense, spec))
    unit = spec.q_per_kv * spec.head_dim
    config = {
        "pruned_attn_idx": [],
        "pruned_mlp_idx": [3, 1],
        "pruned_attn_width": {str(i): spec.num_key_value_heads * unit for i in range(4)},
        "pruned_mlp_width": {str(i): spec.intermediate_size for i in range(4)},
        "weight_reorder": True,
    }
    atomic.write_json(str(run / "pruning_config.json"), config)
    export.export_checkpoint(str(run / "checkpoint"), str(tmp_path / "a"), fmt="compact")
    assert atomic.read_json(str(tmp_path / "a" / "pruning_config.json")) == config

    atomic.write_json(str(run / "pruning_config.json"), {**config, "pruned_mlp_idx": [3]})
    export.export_checkpoint(str(run / "checkpoint"), str(tmp_path / "b"), fmt="compact")
    written = atomic.read_json(str(tmp_path / "b" / "pruning_config.json"))
    assert written["pruned_mlp_idx"] == [1, 3] and "weight_reorder" not in written
    assert "does not match" in caplog.text
    assert hf_io.read_spec(str(tmp_path / "b")) == spec


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model, out = _pruned("mistral"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export(model, str(out))
    assert os.listdir(out) == ["keep.txt"]
    export.export(model, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.safetensors",
        "modeling_multipruner.py",
        "pruning_config.json",
    ]
    assert os.listdir(tmp_path) == ["out"]
    (tmp_path / "plain").mkdir()
    assert os.stat(out).st_mode == os.stat(tmp_path / "plain").st_mode


def test_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    model, out = _pruned("mistral"), tmp_path / "out"
    calls = []
    write = tensor_files._write_safetensors

    def fail_on_second_shard(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("disk full")
        write(*args)

    monkeypatch.setattr(tensor_files, "_write_safetensors", fail_on_second_shard)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(model, str(out), max_shard_bytes=20_000)
    assert len(calls) == 2 and os.listdir(tmp_path) == []

    monkeypatch.setattr(tensor_files, "_write_safetensors", write)
    export.export(model, str(out))
    before = sorted(os.listdir(out))
    calls.clear()
    monkeypatch.setattr(tensor_files, "_write_safetensors", fail_on_second_shard)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export(model, str(out), max_shard_bytes=20_000, overwrite=True)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["out"]


def test_missing_checkpoint_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        export.export_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "export_hf.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(tmp_path):
    ckpt, out = str(tmp_path / "checkpoint"), str(tmp_path / "out")
    missing = _cli(f"--checkpoint={tmp_path / 'nope'}", f"--out={out}")
    assert missing.returncode != 0 and "not a checkpoint" in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not os.path.exists(out)
    checkpoint.save(ckpt, _pruned("qwen2"))
    done = _cli(f"--checkpoint={ckpt}", f"--out={out}", "--format=compact", "--dtype=bfloat16")
    assert done.returncode == 0, done.stderr
    assert hf_io.read_spec(out) == _pruned("qwen2").spec
    assert {entry["dtype"] for entry in _entries(out).values()} == {"BF16"}
    again = _cli(f"--checkpoint={ckpt}", f"--out={out}")
    assert again.returncode != 0 and "not empty" in again.stderr
    assert hf_io.read_spec(out) == _pruned("qwen2").spec
