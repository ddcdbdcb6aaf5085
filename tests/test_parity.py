"""Logit parity of ``hf_io.load_model`` + ``CausalLM`` against transformers, and loader errors.

Each family is a tiny random HF torch model built offline from a config, with every parameter
re-drawn (biases non-zero, norm weights away from one) so that each tensor, transposed or not,
affects the logits. It is saved with ``save_pretrained`` and loaded by our loader.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from models import attention
from models.spec import LayerSpec, RopeSpec, SpecError, spec_from_hf_config
from multipruner_jax.base.mesh import ShardingFor
from multipruner_jax.storage import hf_io

VOCAB = tiny_models.BASE["vocab_size"]
SEQ = 24
FP32_TOL = 1e-4
FAMILIES = list(tiny_models.FAMILIES)
LAYERS = 2


def _hf_model(family: str, **overrides) -> transformers.PreTrainedModel:
    """``tiny_models.hf_model`` with ``LAYERS`` layers."""
    return tiny_models.hf_model(family, num_hidden_layers=LAYERS, **overrides)


def _save(model: transformers.PreTrainedModel, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)


def _shard_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def _tokens(batch: int = 2, seq: int = SEQ) -> np.ndarray:
    """``int32[batch, seq]`` fixed random token ids."""
    return np.random.default_rng(0).integers(0, VOCAB, (batch, seq), dtype=np.int32)


def _hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def _our_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)), np.float32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_logits_match_transformers(family, tmp_path):
    hf = _hf_model(family)
    path = _save(hf, tmp_path)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    ours = _our_logits(hf_io.load_model(path), tokens)
    assert np.abs(ref).max() > 1.0, "logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("family, window", [("llama_gqa", None), ("mistral", 8)])
def test_long_sequence_matches_transformers(family, window, tmp_path):
    """300 tokens > ``attention.BLOCK``: on CPU the blocked attention runs (2 blocks, padded)."""
    assert 300 > attention.BLOCK and 300 % attention.BLOCK
    hf = _hf_model(family, sliding_window=window) if window else _hf_model(family)
    path = _save(hf, tmp_path)
    tokens = _tokens(batch=1, seq=300)
    np.testing.assert_allclose(
        _our_logits(hf_io.load_model(path), tokens), _hf_logits(hf, tokens), rtol=0, atol=FP32_TOL
    )


@pytest.mark.parametrize("seq", [21, 32])
@pytest.mark.parametrize("window", [None, 5, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_matches_xla_attention(seq, window, dtype):
    """Blocks of 8 (padded when ``seq`` is not a multiple) vs ``jax.nn.dot_product_attention``.

    bf16: XLA rounds the probabilities to bf16 before the value product, we keep them in fp32,
    so outputs may differ by one or two bf16 ulps (relative 2**-7 each).
    """
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, seq, 6, 16), dtype)
    k, v = (jax.random.normal(key, (2, seq, 2, 16), dtype) for key in keys[1:])
    local = None if window is None else (window - 1, 0)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)
    out = attention.blocked_attention(q, k, v, window, block=8)
    assert out.dtype == dtype
    rtol, atol = (0.0, 1e-6) if dtype == jnp.float32 else (2**-6, 2**-7)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=rtol, atol=atol
    )


def test_sliding_window_matters(tmp_path):
    """With window 8 < seq 24 the window changes HF's logits, and we follow it."""
    hf = _hf_model("mistral", sliding_window=8)
    path = _save(hf, tmp_path)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    spec = hf_io.read_spec(path)
    assert spec.sliding_window == 8
    unwindowed = _our_logits(
        hf_io.load_model(path, spec=dataclasses.replace(spec, sliding_window=None)), tokens
    )
    assert np.abs(unwindowed - ref).max() > 100 * FP32_TOL
    np.testing.assert_allclose(unwindowed[:, :8], ref[:, :8], rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_logits_close_to_transformers_fp32(family, tmp_path):
    """Our bf16 model vs HF fp32, bounded by HF's own bf16 error on the same weights.

    bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 0.2%); every weight and activation is
    rounded and the errors add up over the layers, so no fixed absolute bound is natural. The
    yardstick is what transformers gets when it runs the same model in bf16: we allow 1.5x its
    max |logit error|. Measured on these models: ours 0.09-0.11 (about 2% of max |logit|),
    transformers bf16 0.11-0.23 (we keep RoPE, softmax and norms in fp32). A wrong tensor or
    transpose gives errors of the order of the logits themselves (~5).
    """
    hf = _hf_model(family)
    path = _save(hf, tmp_path)
    model = hf_io.load_model(path, dtype=jnp.bfloat16)
    assert model.model.embed_tokens.embedding.dtype == jnp.bfloat16
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    hf_bf16_error = np.abs(_hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens) - ref).max()
    assert np.abs(_our_logits(model, tokens) - ref).max() <= 1.5 * hf_bf16_error


def test_sharded_index_checkpoint_loads_identically(tmp_path):
    hf = _hf_model("qwen3")
    single = _save(hf, tmp_path / "single")
    sharded = _save(hf, tmp_path / "sharded", max_shard_size="60KB")
    assert os.path.exists(os.path.join(sharded, hf_io.INDEX_FILE))
    assert len(_shard_files(sharded)) > 1
    tokens = _tokens()
    np.testing.assert_array_equal(
        _our_logits(hf_io.load_model(sharded), tokens),
        _our_logits(hf_io.load_model(single), tokens),
    )


class _RecordingHandle:
    """A safetensors handle whose slices log ``(tensor name, shape read)`` into ``reads``."""

    def __init__(self, handle, reads: list[tuple[str, tuple[int, ...]]]):
        self._handle, self._reads = handle, reads

    def keys(self) -> list[str]:
        return self._handle.keys()

    def get_slice(self, name: str) -> _RecordingSlice:
        return _RecordingSlice(self._handle.get_slice(name), name, self._reads)


class _RecordingSlice:
    def __init__(self, tensor, name: str, reads: list[tuple[str, tuple[int, ...]]]):
        self._tensor, self._name, self._reads = tensor, name, reads

    def get_shape(self) -> list[int]:
        return self._tensor.get_shape()

    def __getitem__(self, index) -> np.ndarray:
        x = self._tensor[index]
        self._reads.append((self._name, x.shape))
        return x


@pytest.fixture
def read_log(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    """Every slice ``hf_io`` reads from a safetensors file, as ``(tensor name, shape)``."""
    reads: list[tuple[str, tuple[int, ...]]] = []

    @contextlib.contextmanager
    def recording_open(file: str, framework: str):
        with safe_open(file, framework=framework) as handle:
            yield _RecordingHandle(handle, reads)

    monkeypatch.setattr(hf_io, "safe_open", recording_open)
    return reads


def _reads_of(reads: list[tuple[str, tuple[int, ...]]], tensor: str) -> list[tuple[int, ...]]:
    return [shape for name, shape in reads if name == tensor]


def _split_kernel_outputs(mesh: Mesh) -> ShardingFor:
    """Kernels split on the output axis over mesh axis "model" where divisible, else replicated."""
    size = mesh.shape["model"]

    def sharding_for(name: str, shape: tuple[int, ...]) -> NamedSharding:
        split = name.endswith("kernel") and shape[-1] % size == 0
        return NamedSharding(mesh, P(None, "model") if split else P())

    return sharding_for


def test_load_onto_named_sharding(tmp_path, read_log):
    """Kernels split on their output axis over 8 devices where divisible, the rest replicated.

    Each device's shard is read from the file on its own: a split kernel is read as 8 slices
    of 1/8 of the tensor, a replicated tensor once, whole.
    """
    hf = _hf_model("qwen2")
    path = _save(hf, tmp_path)
    mesh = Mesh(np.array(jax.devices()), ("model",))
    n = mesh.size
    assert n == 8
    model = hf_io.load_model(path, sharding_for=_split_kernel_outputs(mesh))
    assert _reads_of(read_log, "model.layers.0.self_attn.q_proj.weight") == [(64 // n, 64)] * n
    assert _reads_of(read_log, "model.norm.weight") == [(64,)]
    q = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding == NamedSharding(mesh, P(None, "model"))
    assert q.addressable_shards[0].data.shape == (64, 64 // n)
    down = model.model.layers[1].mlp.down_proj.kernel[...]
    assert down.sharding == NamedSharding(mesh, P(None, "model"))
    assert model.model.layers[0].self_attn.q_proj.bias[...].sharding.is_fully_replicated
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(model, tokens), _our_logits(hf_io.load_model(path), tokens), rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(hf.model.layers[0].self_attn.q_proj.weight.detach()).T
    )


def test_partly_replicated_sharding_reads_each_slice_once(tmp_path, read_log):
    """On a (data=2, model=4) mesh each model-axis slice is read once, not once per device."""
    path = _save(_hf_model("llama_mha"), tmp_path)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model = hf_io.load_model(path, sharding_for=_split_kernel_outputs(mesh))
    assert _reads_of(read_log, "model.layers.0.mlp.up_proj.weight") == [(96 // 4, 64)] * 4
    up = model.model.layers[0].mlp.up_proj.kernel[...]
    assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape == (64, 24)
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(model, tokens), _our_logits(hf_io.load_model(path), tokens), rtol=0, atol=1e-5
    )


def test_pruned_spec_skips_removed_block(tmp_path):
    """A spec without layer 1's MLP loads a file lacking those tensors; the dense spec refuses."""
    hf = _hf_model("llama_mha")
    path = _save(hf, tmp_path)
    file = os.path.join(path, hf_io.SINGLE_FILE)
    tensors = load_file(file)
    removed = [k for k in tensors if k.startswith("model.layers.1.mlp.")]
    assert len(removed) == 3
    save_file({k: v for k, v in tensors.items() if k not in removed}, file)
    spec = hf_io.read_spec(path)
    layers = list(spec.layers)
    layers[1] = dataclasses.replace(layers[1], has_mlp=False)
    model = hf_io.load_model(path, spec=spec.replace_layers(layers))
    assert model.model.layers[1].mlp is None
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight.zero_()
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(model, tokens), _hf_logits(hf, tokens), rtol=0, atol=FP32_TOL
    )
    with pytest.raises(hf_io.WeightsError, match=re.escape(removed[0])):
        hf_io.load_model(path)


def test_pruned_spec_with_fewer_kv_groups_loads_compact_tensors(tmp_path):
    """A compact checkpoint (layer 0 keeps 1 of 2 KV groups) loads with its spec's shapes."""
    hf = _hf_model("qwen2")
    path = _save(hf, tmp_path)
    file = os.path.join(path, hf_io.SINGLE_FILE)
    tensors = load_file(file)
    head_dim, q_rows = 16, 2 * 16
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows = q_rows if proj == "q_proj" else head_dim
        for kind in ("weight", "bias"):
            name = f"model.layers.0.self_attn.{proj}.{kind}"
            tensors[name] = np.ascontiguousarray(tensors[name][:rows])
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name][:, :q_rows])
    save_file(tensors, file)
    spec = hf_io.read_spec(path)
    layers = list(spec.layers)
    layers[0] = dataclasses.replace(layers[0], kv_groups=1)
    model = hf_io.load_model(path, spec=spec.replace_layers(layers))
    assert model.model.layers[0].self_attn.q_proj.kernel.shape == (64, q_rows)
    with torch.no_grad():
        hf.model.layers[0].self_attn.o_proj.weight[:, q_rows:] = 0.0
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(model, tokens), _hf_logits(hf, tokens), rtol=0, atol=FP32_TOL
    )


def test_missing_config_json(tmp_path):
    with pytest.raises(SpecError, match="config.json"):
        hf_io.load_model(str(tmp_path))


def test_no_safetensors_files(tmp_path):
    hf = _hf_model("llama_mha")
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(hf_io.WeightsError, match=r"no model\.safetensors or .*index\.json"):
        hf_io.load_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    path = _save(_hf_model("llama_mha"), tmp_path)
    file = os.path.join(path, hf_io.SINGLE_FILE)
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(
        hf_io.WeightsError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is missing"
    ):
        hf_io.load_model(path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    path = _save(_hf_model("llama_mha"), tmp_path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["intermediate_size"] = 80
    with open(config_file, "w") as f:
        json.dump(config, f)
    expected = r"model\.layers\.0\.mlp\.down_proj\.weight .* shape \(64, 96\) .* implies \(64, 80\)"
    with pytest.raises(hf_io.WeightsError, match=expected):
        hf_io.load_model(path)


def test_corrupt_file_is_named(tmp_path):
    path = _save(_hf_model("llama_mha"), tmp_path, max_shard_size="60KB")
    victim = _shard_files(path)[-1]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(hf_io.WeightsError, match=re.escape(victim)):
        hf_io.load_model(path)


def test_missing_shard_file_is_named(tmp_path):
    path = _save(_hf_model("llama_mha"), tmp_path, max_shard_size="60KB")
    victim = _shard_files(path)[0]
    os.remove(victim)
    with pytest.raises(hf_io.WeightsError, match=re.escape(victim)):
        hf_io.load_model(path)


def test_unsupported_dtype(tmp_path):
    path = _save(_hf_model("llama_mha"), tmp_path)
    with pytest.raises(ValueError, match="float16 is not supported"):
        hf_io.load_model(path, dtype=jnp.float16)


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
def test_transformers4_rope_config_gives_same_logits(type_key, tmp_path):
    """A 4.x config (top-level rope_theta, rope_scaling with "type"/"rope_type") loads the same."""
    hf = _hf_model("llama_gqa")
    path = _save(hf, tmp_path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {type_key: rope.pop("rope_type"), **rope}
    with open(config_file, "w") as f:
        json.dump(config, f)
    spec = hf_io.read_spec(path)
    assert spec.rope == RopeSpec(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    tokens = _tokens()
    np.testing.assert_allclose(
        _our_logits(hf_io.load_model(path), tokens), _hf_logits(hf, tokens), rtol=0, atol=FP32_TOL
    )


def test_transformers4_linear_rope_and_null_scaling():
    base = dict(tiny_models.BASE, model_type="llama", num_attention_heads=4, num_hidden_layers=2)
    linear = spec_from_hf_config(
        {**base, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert linear.rope == RopeSpec(theta=1e6, rope_type="linear", factor=2.0)
    plain = spec_from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert plain.rope == RopeSpec(theta=5e5)
    assert plain.layers == (LayerSpec(True, 4, True, 96),) * 2


def test_unsupported_model_type_lists_supported(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "n_embd": 64}, f)
    with pytest.raises(SpecError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
        hf_io.read_spec(str(tmp_path))
