"""The ``gguf`` serving layout: one GGUF file of llama.cpp's ``deci`` architecture.

llama.cpp (and Ollama and LM Studio, which embed it) reads ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` as per-layer arrays of any
values, so a pruned model is written at its exact shapes, fewer query heads included. Tensors
follow llama.cpp's names (``blk.N.attn_q.weight`` ...) with q/k rows permuted per layer to GGML's
pairwise rope order. Three llama.cpp bugs (present in the current upstream code too) need zeros:

* a layer that keeps attention but lost its MLP (``n_ff = 0``) has its attention output dropped,
  and a last layer without MLP crashes: such layers get a zero MLP of 256 channels;
* a layer 0 without attention (``n_head = 0``) fails to load (the head size is read from layer 0):
  it gets one zero head.

The vocabulary goes into the file as llama.cpp expects it: ``gguf_vocab`` reads the model's
``tokenizer.json`` (BPE) or ``tokenizer.model`` (SentencePiece). Qwen3's q/k norm has no place in
the ``deci`` graph, so Qwen3 is refused. Tensors are converted and written one at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from models import rope
from models.spec import ModelSpec
from multipruner_jax.base import atomic
from multipruner_jax.exporting import gguf_vocab
from multipruner_jax.exporting.padding import Padding
from multipruner_jax.exporting.tensor_files import by_name, model_tensors

ARCH = "deci"
FAMILIES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "float16", "bfloat16", "q8_0")
FILE_NAME = "model.gguf"
README_NAME = "README.md"
MODELFILE_NAME = "Modelfile"  # Ollama's
ZERO_MLP_WIDTH = 256
_Q = gguf.GGMLQuantizationType
_QTYPE = {"float32": _Q.F32, "float16": _Q.F16, "bfloat16": _Q.BF16, "q8_0": _Q.Q8_0}
_FILE_TYPE = {
    "float32": gguf.LlamaFileType.ALL_F32,
    "float16": gguf.LlamaFileType.MOSTLY_F16,
    "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


@dataclass(frozen=True)
class _Entry:
    """One GGUF tensor: its name, float32 HF-layout shape and the function that makes it."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Per-layer counts as written (``n_ff = 0``: no MLP; ``n_head = 0``: no attention)."""

    head_count: list[int]
    head_count_kv: list[int]
    feed_forward_length: list[int]


def layout(spec: ModelSpec) -> tuple[Layout, Padding]:
    """What each layer is written as, with the zeros the llama.cpp workarounds add."""
    heads, kv, ff, padding = [], [], [], Padding()
    dim, hidden, last = spec.head_dim, spec.hidden_size, spec.num_layers - 1
    for i, layer in enumerate(spec.layers):
        n_kv = layer.kv_groups if layer.has_attn else (1 if i == 0 else 0)
        n_head = layer.kv_groups * spec.q_per_kv if layer.has_attn else n_kv
        n_ff = layer.mlp_width if layer.has_mlp else 0
        if not layer.has_attn and i == 0:
            padding.add(
                i,
                "one zero attention head (llama.cpp cannot load layer 0 without)",
                4 * dim * hidden,
            )
        if not layer.has_mlp and (n_head or i == last):
            n_ff = ZERO_MLP_WIDTH
            padding.add(
                i,
                f"zero MLP of {ZERO_MLP_WIDTH} channels (llama.cpp drops or crashes without)",
                3 * ZERO_MLP_WIDTH * hidden,
            )
        heads.append(n_head)
        kv.append(n_kv)
        ff.append(n_ff)
    return Layout(heads, kv, ff), padding


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows of ``q_proj``/``k_proj`` (weight ``[heads * dim, in]`` or bias
    ``[heads * dim]``) -> GGML's pairwise order, head by head."""
    if n_heads == 0:
        return w
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``permute_rows``."""
    if n_heads == 0:
        return w
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def rope_factors(spec: ModelSpec) -> np.ndarray | None:
    """``float32[head_dim // 2]`` divisors of the default frequencies for llama3 rope (GGML's
    ``rope_freqs``); ``None`` for other rope types."""
    if spec.rope.rope_type != "llama3":
        return None
    plain = rope.inv_freq(type(spec.rope)(theta=spec.rope.theta), spec.head_dim)
    return (plain / rope.inv_freq(spec.rope, spec.head_dim)).astype(np.float32)


def _entries(model: Any, plan: Layout) -> list[_Entry]:
    spec: ModelSpec = model.spec
    own = by_name(model_tensors(model))
    dim, hidden = spec.head_dim, spec.hidden_size

    def hf(name: str, permute_heads: int | None = None) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            x = own[name].array(np.dtype(np.float32))
            return permute_rows(x, permute_heads) if permute_heads else x

        return make

    def zero(name: str, shape: tuple[int, ...]) -> _Entry:
        return _Entry(name, shape, lambda: np.zeros(shape, np.float32))

    def entry(name: str, source: str, permute_heads: int | None = None) -> _Entry:
        return _Entry(name, tuple(own[source].shape), hf(source, permute_heads))

    out = [entry("token_embd.weight", "model.embed_tokens.weight")]
    factors = rope_factors(spec)
    if factors is not None:
        out.append(_Entry("rope_freqs.weight", factors.shape, lambda: factors))
    for i, layer in enumerate(spec.layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        n_head, n_kv, n_ff = plan.head_count[i], plan.head_count_kv[i], plan.feed_forward_length[i]
        if n_head:
            out.append(entry(b + "attn_norm.weight", p + "input_layernorm.weight"))
        if layer.has_attn:
            a = p + "self_attn."
            out += [
                entry(b + "attn_q.weight", a + "q_proj.weight", n_head),
                entry(b + "attn_k.weight", a + "k_proj.weight", n_kv),
                entry(b + "attn_v.weight", a + "v_proj.weight"),
                entry(b + "attn_output.weight", a + "o_proj.weight"),
            ]
            if spec.qkv_bias:
                out += [
                    entry(b + "attn_q.bias", a + "q_proj.bias", n_head),
                    entry(b + "attn_k.bias", a + "k_proj.bias", n_kv),
                    entry(b + "attn_v.bias", a + "v_proj.bias"),
                ]
            if spec.o_bias:
                out.append(entry(b + "attn_output.bias", a + "o_proj.bias"))
        elif n_head:
            out += [
                zero(b + "attn_q.weight", (dim, hidden)),
                zero(b + "attn_k.weight", (dim, hidden)),
                zero(b + "attn_v.weight", (dim, hidden)),
                zero(b + "attn_output.weight", (hidden, dim)),
            ]
        if n_ff:
            out.append(entry(b + "ffn_norm.weight", p + "post_attention_layernorm.weight"))
        if layer.has_mlp:
            m = p + "mlp."
            out += [
                entry(b + "ffn_gate.weight", m + "gate_proj.weight"),
                entry(b + "ffn_up.weight", m + "up_proj.weight"),
                entry(b + "ffn_down.weight", m + "down_proj.weight"),
            ]
        elif n_ff:
            out += [
                zero(b + "ffn_gate.weight", (n_ff, hidden)),
                zero(b + "ffn_up.weight", (n_ff, hidden)),
                zero(b + "ffn_down.weight", (hidden, n_ff)),
            ]
    out.append(entry("output_norm.weight", "model.norm.weight"))
    if "lm_head.weight" in own:
        out.append(entry("output.weight", "lm_head.weight"))
    return out


def _qtype(entry: _Entry, dtype: str) -> gguf.GGMLQuantizationType:
    """Vectors stay float32; a q8_0 matrix whose rows are not whole blocks falls back to f16."""
    if len(entry.shape) == 1:
        return _Q.F32
    qtype = _QTYPE[dtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if entry.shape[-1] % block == 0 else _Q.F16


def _encode(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == _Q.F32:
        return np.ascontiguousarray(x, np.float32)
    if qtype == _Q.F16:
        return np.ascontiguousarray(x, np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), qtype)


def _metadata(w: gguf.GGUFWriter, spec: ModelSpec, plan: Layout, dtype: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPE[dtype]))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(spec.vocab_size)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(plan.feed_forward_length)
    w.add_head_count(plan.head_count)
    w.add_head_count_kv(plan.head_count_kv)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope.theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    if spec.rope.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope.factor)


def _write_file(
    path: str,
    spec: ModelSpec,
    plan: Layout,
    entries: list[_Entry],
    qtypes: list[gguf.GGMLQuantizationType],
    dtype: str,
    vocab: gguf_vocab.Vocab,
    name: str,
) -> None:
    """The GGUF file: metadata and tensor infos first, then the tensors one at a time."""
    w = gguf.GGUFWriter(path, arch=ARCH)
    _metadata(w, spec, plan, dtype, name)
    vocab.add_to(w)
    for e, qtype in zip(entries, qtypes, strict=True):
        if qtype in (_Q.F32, _Q.F16):
            np_dtype = np.dtype(np.float32 if qtype == _Q.F32 else np.float16)
            nbytes = int(np.prod(e.shape)) * np_dtype.itemsize
            w.add_tensor_info(e.name, e.shape, np_dtype, nbytes)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(e.shape, qtype)
            w.add_tensor_info(
                e.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for e, qtype in zip(entries, qtypes, strict=True):
        w.write_tensor_data(_encode(e.make(), qtype))
    w.close()


def write(model: Any, folder: str, dtype: str, tokenizer: Any) -> Padding:
    """Write ``folder/model.gguf`` and a README on how to run it; returns the padding."""
    spec: ModelSpec = model.spec
    vocab = gguf_vocab.read(tokenizer, spec.vocab_size)
    plan, padding = layout(spec)
    entries = _entries(model, plan)
    qtypes = [_qtype(e, dtype) for e in entries]
    path = os.path.join(folder, FILE_NAME)
    with atomic.naming(path):
        name = os.path.basename(os.path.normpath(folder))
        _write_file(path, spec, plan, entries, qtypes, dtype, vocab, name)
    fallbacks = sorted(
        {
            e.name.split(".")[-2]
            for e, q in zip(entries, qtypes, strict=True)
            if len(e.shape) > 1 and q != _QTYPE[dtype]
        }
    )
    with open(os.path.join(folder, README_NAME), "w") as f:
        f.write(_readme(spec, plan, dtype, fallbacks))
    with open(os.path.join(folder, MODELFILE_NAME), "w") as f:
        f.write(f"FROM ./{FILE_NAME}\n")
    return padding


def _readme(spec: ModelSpec, plan: Layout, dtype: str, fallbacks: list[str]) -> str:
    removed_attn = sum(1 for h in plan.head_count if h == 0)
    removed_mlp = sum(1 for f in plan.feed_forward_length if f == 0)
    note = ""
    if fallbacks:
        note = (
            f"\nTensors whose rows are not whole {dtype} blocks are stored as float16: "
            f"{', '.join(fallbacks)}.\n"
        )
    return f"""# A MultiPruner-pruned {spec.model_type} model in GGUF ({dtype})

llama.cpp architecture `deci`.

{spec.num_layers} layers with their own shapes: {removed_attn} without attention, {removed_mlp}
without MLP; per-layer query heads {plan.head_count}, KV heads {plan.head_count_kv} and MLP widths
{plan.feed_forward_length}.
{note}
Run it:

    llama-cli -m {FILE_NAME} -fa on -p "Once upon a time"
    llama-server -m {FILE_NAME} -fa on

`-fa on` (flash attention) stores each layer's V cache at its own width; without it llama.cpp pads
the V cache to the widest layer. Smaller files: `llama-quantize {FILE_NAME} model-Q4_K_M.gguf
Q4_K_M` (K-quants need row lengths that are multiples of 256; other tensors fall back).

Ollama (the `{MODELFILE_NAME}` here says `FROM ./{FILE_NAME}`):

    ollama create pruned -f {MODELFILE_NAME} && ollama run pruned

Python: `llama_cpp.Llama(model_path="{FILE_NAME}", flash_attn=True)`.
"""
