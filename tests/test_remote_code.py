"""Compact exports load in stock transformers through their own modeling file (remote code).

Per family (tiny models with every kind of removal at once, with and without a sliding window)
the compact export, loaded by ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``, computes the pruned JAX model's logits and the padded export's (stock
classes), generates with its KV cache what it generates without, survives ``save_pretrained``,
counts its parameters as we do, runs in bf16/fp16 and under ``device_map="auto"``. Directories
whose tensors disagree with their config fail in one sentence. The real SmolLM2-135M pruned by the
demo's configuration closes the file.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from flax import nnx

from models.decoder import CausalLM
from models.families import FAMILIES
from models.spec import (
    LayerSpec,
    ModelSpec,
    SpecError,
    count_params,
    dense_spec,
    spec_to_hf_config,
)
from multipruner_jax.exporting import export
from multipruner_jax.prune import surgery
from multipruner_jax.storage import assets, checkpoint, hf_io, pruning_config, remote_code

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "tests", "data", "smollm2_demo_pruning_config.json")
AUTO = transformers.AutoModelForCausalLM
TOL = 1e-4
WINDOW = 8
TOKENS = tiny_models.tokens(2, 20)  # longer than WINDOW
PROMPT = torch.from_numpy(TOKENS[:, :12]).long()
NEW_TOKENS = 16
CASES = [(family, None) for family in tiny_models.FAMILIES] + [
    (family, WINDOW) for family in ("mistral", "qwen2", "qwen3")
]


def every_removal(spec: ModelSpec) -> ModelSpec:
    """Layer 0 loses its attention and a third of its MLP, layer 1 a KV group and its MLP,
    layer 2 both blocks; layer 3 stays dense. Layer 0 having no attention means the KV cache
    must not be indexed by layer number."""
    kv, width = spec.num_key_value_heads, spec.intermediate_size
    return spec.replace_layers(
        [
            LayerSpec(False, kv, True, width - 32),
            LayerSpec(True, kv - 1, False, width),
            LayerSpec(False, kv, False, width),
            LayerSpec(True, kv, True, width),
        ]
    )


def _pruned(family: str, window: int | None) -> CausalLM:
    dense = tiny_models.model(family)
    spec = dataclasses.replace(dense.spec, sliding_window=window)
    return surgery.shrink(dense, every_removal(spec))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _jax_logits(model: CausalLM, tokens: np.ndarray) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))


def _logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _greedy(model: transformers.PreTrainedModel, prompt: torch.Tensor, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)


def _load(path: str, **kw) -> transformers.PreTrainedModel:
    return AUTO.from_pretrained(path, trust_remote_code=True, **kw).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU: one thread avoids waits on busy cores (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class Case:
    model: CausalLM
    compact: str
    padded: str
    torch_model: transformers.PreTrainedModel
    stock: transformers.PreTrainedModel


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-w{w}" if w else f for f, w in CASES])
def case(request, tmp_path_factory) -> Case:
    """A pruned tiny model exported in both formats and loaded back in torch."""
    family, window = request.param
    model = _pruned(family, window)
    root = tmp_path_factory.mktemp(f"{family}-w{window}")
    compact, padded = str(root / "compact"), str(root / "padded")
    export.export(model, compact)
    export.export(model, padded, fmt="padded")
    stock = AUTO.from_pretrained(padded, dtype=torch.float32).eval()
    return Case(model, compact, padded, _load(compact, dtype=torch.float32), stock)


def test_compact_logits_match_jax_and_padded(case):
    assert type(case.torch_model).__name__ == remote_code.MODEL_CLASS
    ours = _jax_logits(case.model, TOKENS)
    assert np.abs(ours).max() > 1.0, "logits too small for the tolerance to mean anything"
    logits = _logits(case.torch_model, TOKENS)
    np.testing.assert_allclose(logits, ours, rtol=0, atol=TOL)
    np.testing.assert_allclose(logits, _logits(case.stock, TOKENS), rtol=0, atol=TOL)


def test_cached_generation_equals_uncached_and_padded(case):
    cached = _greedy(case.torch_model, PROMPT)
    assert cached.shape == (2, PROMPT.shape[1] + NEW_TOKENS)
    assert torch.equal(cached, _greedy(case.torch_model, PROMPT, use_cache=False))
    assert torch.equal(cached, _greedy(case.stock, PROMPT))
    with torch.inference_mode():
        cache = case.torch_model(PROMPT, use_cache=True).cache
    assert cache.get_seq_length() == PROMPT.shape[1]  # layer 0 has no attention


def test_left_padded_batch_generates_each_row_alone(case):
    short = PROMPT[1:, :9]
    batch = torch.cat([PROMPT[:1], torch.cat([torch.zeros_like(PROMPT[:1, :3]), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    both = _greedy(case.torch_model, batch, attention_mask=mask)
    assert torch.equal(both[0], _greedy(case.torch_model, PROMPT[:1])[0])
    assert torch.equal(both[1, 12:], _greedy(case.torch_model, short)[0, 9:])


def test_num_parameters_equal_our_count(case):
    count = count_params(case.model.spec)
    assert case.torch_model.num_parameters() == count
    assert case.stock.num_parameters() == count_params(dense_spec(case.model.spec))
    assert count < case.stock.num_parameters()


def test_config_is_the_dense_family_config_plus_the_layer_shapes(case, tmp_path):
    spec = case.model.spec
    with open(os.path.join(case.compact, hf_io.CONFIG_FILE)) as f:
        written = json.load(f)
    dense = spec_to_hf_config(spec)
    assert {k: v for k, v in written.items() if k in dense} == dense
    assert set(written) - set(dense) == {"auto_map", remote_code.LAYERS_KEY}
    assert written["auto_map"] == {
        "AutoModelForCausalLM": f"modeling_multipruner.{remote_code.MODEL_CLASS}"
    }
    layers = written[remote_code.LAYERS_KEY]
    assert [(e["num_attention_heads"], e["intermediate_size"]) for e in layers] == [
        (0, spec.intermediate_size - 32),
        ((spec.num_key_value_heads - 1) * spec.q_per_kv, 0),
        (0, 0),
        (spec.num_attention_heads, spec.intermediate_size),
    ]
    assert [e["num_key_value_heads"] for e in layers] == [0, spec.num_key_value_heads - 1, 0] + [
        spec.num_key_value_heads
    ]
    # The family's stock config class keeps the key through a load and a save.
    stock = transformers.AutoConfig.from_pretrained(case.compact)
    assert stock.model_type == spec.model_type
    stock.save_pretrained(str(tmp_path))
    with open(tmp_path / hf_io.CONFIG_FILE) as f:
        resaved = json.load(f)
    assert resaved[remote_code.LAYERS_KEY] == layers and resaved["auto_map"] == written["auto_map"]
    assert hf_io.read_dense_spec(case.compact) == dense_spec(spec)
    assert hf_io.read_spec(case.compact) == spec


def test_save_pretrained_round_trip(case, tmp_path):
    case.torch_model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "modeling_multipruner.py")
    reloaded = _load(str(tmp_path), dtype=torch.float32)
    np.testing.assert_array_equal(_logits(reloaded, TOKENS), _logits(case.torch_model, TOKENS))
    assert reloaded.num_parameters() == case.torch_model.num_parameters()
    assert torch.equal(_greedy(reloaded, PROMPT), _greedy(case.torch_model, PROMPT))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_loads_and_runs(case, dtype):
    half = _load(case.compact, dtype=dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    reference = _logits(case.torch_model, TOKENS)
    stock = _logits(AUTO.from_pretrained(case.padded, dtype=dtype), TOKENS)
    ours = _logits(half, TOKENS)
    stock_error = np.abs(stock - reference).max()
    assert np.isfinite(ours).all() and stock_error > 0
    # Agrees with stock transformers in the same precision far better than either with fp32.
    assert np.abs(ours - stock).max() <= 0.1 * stock_error
    assert _greedy(half, PROMPT).shape == (2, PROMPT.shape[1] + NEW_TOKENS)


def test_device_map_auto_offloads_and_runs(case, tmp_path):
    size = sum(p.numel() * p.element_size() for p in case.torch_model.parameters())
    spread = _load(
        case.compact,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": int(0.8 * size)},
        offload_folder=str(tmp_path),
    )
    assert set(spread.hf_device_map.values()) == {"cpu", "disk"}
    np.testing.assert_allclose(
        _logits(spread, TOKENS), _logits(case.torch_model, TOKENS), rtol=0, atol=1e-6
    )
    assert torch.equal(_greedy(spread, PROMPT), _greedy(case.torch_model, PROMPT))


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("llama") / "compact")
    export.export(_pruned("llama_gqa", None), out)
    return out


def _tampered(source: str, folder, change) -> str:
    shutil.copytree(source, folder)
    with open(os.path.join(folder, hf_io.CONFIG_FILE)) as f:
        config = json.load(f)
    change(config)
    with open(os.path.join(folder, hf_io.CONFIG_FILE), "w") as f:
        json.dump(config, f)
    return str(folder)


def _narrower(config):
    config[remote_code.LAYERS_KEY][3]["intermediate_size"] = 64


def _restored_mlp(config):
    config[remote_code.LAYERS_KEY][1]["intermediate_size"] = 96


def _removed_attention(config):
    config[remote_code.LAYERS_KEY][3].update(num_attention_heads=0, num_key_value_heads=0)


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            _narrower,
            "model.safetensors: tensor model.layers.3.mlp.down_proj.weight has shape (64, 96), "
            "but config.json (multipruner_layers) expects (64, 64)",
        ),
        (
            _restored_mlp,
            "bad: tensor model.layers.1.mlp.gate_proj.weight of shape (96, 64) is missing from "
            "the weight files, but config.json (multipruner_layers) has it",
        ),
        (_removed_attention, "tensor model.layers.3.self_attn.k_proj.weight (16, 64) belongs to"),
    ],
    ids=["narrower", "restored", "removed"],
)
def test_tensors_that_disagree_with_the_config_fail_in_one_sentence(
    llama_export, tmp_path, change, expected
):
    folder = _tampered(llama_export, tmp_path / "bad", change)
    with pytest.raises(ValueError) as error:
        _load(folder)
    message = str(error.value)
    assert expected in message and "\n" not in message and message.count(". ") == 0


def _shorter(config):
    config[remote_code.LAYERS_KEY].pop()


def _odd_heads(config):
    config[remote_code.LAYERS_KEY][0]["num_attention_heads"] = 3


def _mixed_windows(config):
    config.update(sliding_window=WINDOW, layer_types=["sliding_attention"] + ["full_attention"] * 3)


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            _shorter,
            r"^config.json multipruner_layers must be a list with one entry per layer \(4\)$",
        ),
        (_odd_heads, r"^config.json multipruner_layers\[0\] = .* does not fit the dense model"),
        (_mixed_windows, r"^config.json layer_types mixes attention types"),
    ],
    ids=["shorter", "odd-heads", "mixed-windows"],
)
def test_a_config_this_model_cannot_build_fails_in_one_sentence(
    llama_export, tmp_path, change, expected
):
    folder = _tampered(llama_export, tmp_path / "bad", change)
    with pytest.raises(ValueError, match=expected):
        _load(folder)


def test_static_cache_is_refused_in_one_sentence(llama_export):
    model = _load(llama_export)
    with pytest.raises(ValueError, match=r"^attention_mask must be a \[batch, tokens\] tensor"):
        _greedy(model, PROMPT, cache_implementation="static")


def test_failed_compact_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(remote_code, "MODELING_FILE", str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError):
        export.export(_pruned("qwen3", None), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The modeling file and the command line


def test_modeling_file_is_self_contained():
    with open(remote_code.MODELING_FILE) as f:
        tree = ast.parse(f.read())
    imported = {
        alias.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for alias in n.names
    }
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__", "json", "math", "os", "struct", "torch", "transformers"}
    constants = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
    }
    assert constants["LAYERS_KEY"] == remote_code.LAYERS_KEY
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert remote_code.MODEL_CLASS in classes


def _modeling_module():
    spec = importlib.util.spec_from_file_location("modeling_multipruner", remote_code.MODELING_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_modeling_files_family_table_agrees_with_ours():
    """The modeling file keeps its own copy of the family rules (it cannot import us): every
    config we write reads there with the biases, q/k norms and window our spec has."""
    modeling = _modeling_module()
    assert set(modeling.FAMILIES) == set(FAMILIES) | {modeling.DECILM}
    assert {tiny_models.FAMILIES[f]["model_type"] for f in tiny_models.FAMILIES} == set(FAMILIES)
    checked = 0
    for family in ("llama_gqa", "mistral", "qwen2", "qwen3"):
        for qkv_bias, o_bias in ((False, False), (True, True), (True, False)):
            for window in (None, WINDOW):
                spec = dataclasses.replace(
                    tiny_models.spec(family),
                    qkv_bias=qkv_bias,
                    o_bias=o_bias,
                    sliding_window=window,
                )
                try:
                    cfg = spec_to_hf_config(spec)
                except SpecError:  # not expressible in this family's config
                    continue
                config = transformers.AutoConfig.for_model(**cfg)
                with torch.device("meta"):
                    attn = modeling.MultiPrunerAttention(config, 2, 1, 0)
                read = (
                    attn.q_proj.bias is not None,
                    attn.o_proj.bias is not None,
                    attn.q_norm is not None,
                    modeling._sliding_window(config),
                )
                assert read == (spec.qkv_bias, spec.o_bias, spec.qk_norm, window), (family, cfg)
                checked += 1
    # llama: 2 bias settings, no window; mistral: no bias, 2 windows; qwen2: q/k/v bias, 2
    # windows; qwen3: 2 bias settings x 2 windows
    assert checked == 10


def test_cli_exports_compact_by_default(tmp_path):
    ckpt, out = str(tmp_path / "checkpoint"), str(tmp_path / "out")
    model = _pruned("qwen2", WINDOW)
    checkpoint.save(ckpt, model)
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "export_hf.py"),
            f"--checkpoint={ckpt}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote compact" in done.stdout
    loaded = _load(out, dtype=torch.float32)
    np.testing.assert_allclose(
        _logits(loaded, TOKENS), _jax_logits(model, TOKENS), rtol=0, atol=TOL
    )


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M, pruned by the demo's configuration


def test_smollm2_demo_compact_export_matches_jax(tmp_path):
    """The demo's 10 % SmolLM2 (reordered, 4 attention blocks and 12 MLP groups removed) in
    torch against JAX on 256 State of the Union tokens.

    Logits reach ~40 here, so the bound is test_smollm2's fp32 noise floor for this 30-layer
    model, 5e-4 (observed 8.5e-5); transformers' own sdpa and eager paths differ by 1e-4.
    """
    path = str(assets.smollm2_dir())
    if not os.path.isfile(os.path.join(path, hf_io.CONFIG_FILE)):
        pytest.fail(f"{path} is missing; run `make assets` to build the SmolLM2-135M directory")
    model = hf_io.load_model(path)
    config = pruning_config.load(DEMO_CONFIG)
    assert config["weight_reorder"]
    surgery.reorder(model)
    pruned = surgery.shrink(model, pruning_config.to_spec(model.spec, config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with open(sorted(glob.glob(os.path.join(assets.sotu_dir(), "*.txt")))[-1]) as f:
        tokens = np.asarray(tokenizer(f.read())["input_ids"][:256], np.int32)[None]
    ours = _jax_logits(pruned, tokens)
    out = str(tmp_path / "smollm2-compact")
    export.export(pruned, out, tokenizer=path, config=config)
    loaded = _load(out, dtype=torch.float32)
    assert loaded.num_parameters() == count_params(pruned.spec) == 120_359_232
    assert np.abs(ours).max() > 10.0
    np.testing.assert_allclose(_logits(loaded, tokens), ours, rtol=0, atol=5e-4)
    prompt = torch.from_numpy(tokens[:, :32]).long()
    with torch.inference_mode():
        cached = loaded.generate(prompt, max_new_tokens=8, do_sample=False)
        uncached = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert transformers.AutoTokenizer.from_pretrained(out).decode(cached[0, 32:])
    prompt_text = "The history of the United States began"
    ids = tokenizer(prompt_text)["input_ids"]
    for _ in range(8):  # greedy in JAX, recomputing the whole sequence each step
        ids.append(int(_jax_logits(pruned, np.asarray([ids], np.int32))[0, -1].argmax()))
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "generate.py"),
            f"--model_path={out}",
            f"--prompt={prompt_text}",
            "--max_new_tokens=8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trust_remote_code=True" in done.stdout
    expected = tokenizer.decode(ids[-8:], skip_special_tokens=True)
    assert f"{prompt_text}{expected}" in done.stdout
