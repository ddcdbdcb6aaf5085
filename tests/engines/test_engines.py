"""Pruned models in the real serving engines on this CPU: llama.cpp (``gguf``), mlx-lm and vLLM
(``decilm``), each from its own virtualenv (``make engines``), driven through ``engines.harness``.

Every case is compared with our JAX model of the same pruned parameters, in fp32, on two prompts:
all prompt positions' logits (vLLM: its top-20 prompt log-probabilities) and 16 greedy tokens.
The cases cover every kind of removal at once, including the ones each engine needs a workaround
for: layer 0 without attention, a layer with attention but no MLP, the last layer without MLP,
both blocks of a layer removed, KV groups kept that do not divide the query heads, and an MLP
width that is not a multiple of 256. Tiny random models run every family the formats carry; the
real SmolLM2-135M runs the same kinds of removal on a trained model.

Tolerances: the engines compute in fp32 with their own kernels and summation orders, so logits
differ from ours by rounding only. Measured here on SmolLM2 (logits span about +-30): llama.cpp
1.9e-3, mlx-lm 2.2e-3 (its reference BLAS sums in another order), vLLM far less; on the tiny
models about 1e-5. ``LOGIT_TOL`` = 1e-2 is several times that and still far below any real error:
a misplaced head, a wrong rope base or a dropped block moves logits by 0.1 to 10. (The pruned
SmolLM2 here has layer 0's attention removed and is much more sensitive to rounding than a
searched model: an f16 KV cache moves its logits by 0.18.)
Greedy tokens are compared up to the first step where our own top-2 logits are closer than ten
times the engine's measured logit error on the prompt (a near tie that rounding may legitimately
break the other way); the test asserts that this leaves at least 8 of the 16 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import numpy as np
import pytest
import transformers

from engines import harness
from models.spec import LayerSpec
from multipruner_jax.exporting import export
from multipruner_jax.prune import surgery
from multipruner_jax.storage import assets, hf_io

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import pruned_models  # noqa: E402  (bench/: a pruning config applied as prune.py does)
import test_serving_export as serving  # noqa: E402  (tests/ holds the shared tiny cases)

LOGIT_TOL = 1e-2
GREEDY = 16
PROMPT_LEN = 12
TINY = ("llama_mha", "llama_gqa", "mistral", "qwen2")
ENGINE_FORMAT = {"llamacpp": "gguf", "mlx": "decilm", "vllm": "decilm"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(REPO, "tests", "data", "smollm2_demo_pruning_config.json")
TEXTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "In 1776 the United States declared independence from Great Britain.",
]


def smollm2_every_removal(spec):
    """SmolLM2-135M (30 layers, 9 query heads in 3 KV groups, MLP 1536) with every kind of
    removal: layer 0 without attention, attention removed in 5, MLP removed in 7 (attention
    kept), widths 1024 (a multiple of 256) and 640 (not), 2 of 3 KV groups (2 does not divide
    9) and 1 of 3, both blocks of 25 removed, and the last layer without MLP."""
    layers = list(spec.layers)

    def cut(i: int, **kw) -> None:
        layers[i] = dataclasses.replace(layers[i], **kw)

    cut(0, has_attn=False, kv_groups=0)
    cut(5, has_attn=False, kv_groups=0)
    cut(7, has_mlp=False, mlp_width=0)
    cut(10, mlp_width=1024)
    cut(12, kv_groups=2)
    cut(14, mlp_width=640)
    cut(20, kv_groups=1)
    cut(25, has_attn=False, kv_groups=0, has_mlp=False, mlp_width=0)
    cut(29, has_mlp=False, mlp_width=0)
    return spec.replace_layers(layers)


@dataclasses.dataclass
class Case:
    """One pruned model, its exports and our JAX reference on the prompts."""

    model: object
    prompts: np.ndarray  # int32[2, PROMPT_LEN]
    logits: np.ndarray  # float64[2, PROMPT_LEN, vocab]
    greedy: np.ndarray  # int32[2, GREEDY]
    margins: np.ndarray  # float64[2, GREEDY]: our top-1 minus top-2 logit at each greedy step
    paths: dict[str, str]


def _reference(model, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt logits, then greedy tokens by re-running the whole sequence (one compiled length:
    later positions never affect earlier ones in a causal model)."""
    total = prompts.shape[1] + GREEDY
    seq = np.zeros((len(prompts), total), np.int32)
    seq[:, : prompts.shape[1]] = prompts
    logits = None
    greedy, margins = [], []
    for t in range(prompts.shape[1], total + 1):
        out = np.asarray(model(seq), np.float64)
        if logits is None:
            logits = out[:, : prompts.shape[1]]
        step = out[:, t - 1]
        top2 = np.sort(step, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        greedy.append(step.argmax(-1))
        if t < total:
            seq[:, t] = greedy[-1]
    return logits, np.stack(greedy, 1).astype(np.int32), np.stack(margins, 1)


def _build(name: str, tmp) -> Case:
    tokenizer = str(assets.smollm2_dir())
    if name == "smollm2":
        dense = hf_io.load_model(tokenizer)
        model = surgery.shrink(dense, smollm2_every_removal(dense.spec))
    else:
        # hidden 512: head sizes 64 and 128 (vLLM's CPU attention has kernels for common head
        # sizes only, not 8 or 16; mlx-lm derives the head size as hidden / heads).
        model = serving.pruned(name, vocab_size=serving.SMOLLM2_VOCAB, hidden_size=512)
    rng = np.random.default_rng(1)
    prompts = rng.integers(16, model.spec.vocab_size, (2, PROMPT_LEN)).astype(np.int32)
    logits, greedy, margins = _reference(model, prompts)
    paths = {}
    for fmt in ("decilm", "gguf"):
        out = tmp / f"{name}-{fmt}"
        export.export(model, str(out), fmt=fmt, tokenizer=tokenizer)
        paths[fmt] = str(out / "model.gguf") if fmt == "gguf" else str(out)
    return Case(model, prompts, logits, greedy, margins, paths)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    return functools.cache(lambda name: _build(name, tmp))


def _run(engine: str, case: Case, **extra) -> dict[str, np.ndarray]:
    reason = harness.unavailable_reason(engine)
    assert reason is None, reason  # never skipped: `make test-engines` builds the venvs
    request = {"mode": "check", "prompts": case.prompts.tolist(), "greedy_tokens": GREEDY}
    return harness.run(engine, case.paths[ENGINE_FORMAT[engine]], {**request, **extra})


def _check_greedy(got: np.ndarray, case: Case, error: float) -> None:
    """``got`` equals our greedy tokens up to our first near tie (top-2 within 10 x ``error``)."""
    for row in range(len(got)):
        ties = np.flatnonzero(case.margins[row] < 10 * max(error, 1e-6))
        trusted = int(ties[0]) if len(ties) else GREEDY
        assert trusted >= GREEDY // 2, f"prompt {row}: near tie at step {trusted}"
        np.testing.assert_array_equal(got[row, :trusted], case.greedy[row, :trusted])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("engine", ["llamacpp", "mlx"])
@pytest.mark.parametrize("name", [*TINY, "smollm2"])
def test_engine_logits_and_greedy_equal_the_jax_model(engine, name, cases):
    case = cases(name)
    out = _run(engine, case)
    assert out["logits"].shape == case.logits.shape
    error = np.abs(out["logits"] - case.logits).max()
    assert error < LOGIT_TOL
    _check_greedy(out["greedy"], case, error)


@pytest.mark.parametrize("name", [*TINY, "smollm2"])
def test_vllm_logprobs_and_greedy_equal_the_jax_model(name, cases):
    case = cases(name)
    out = _run("vllm", case, top_k=20)
    ids, values = out["logprob_ids"], out["logprob_values"]
    ours = np.take_along_axis(_log_softmax(case.logits), ids.astype(np.int64), axis=-1)
    error = np.abs(values - ours).max()
    assert error < LOGIT_TOL
    # vLLM's top-1 is our argmax wherever we have no near tie.
    clear = np.diff(np.sort(case.logits, -1)[..., -2:], axis=-1)[..., 0] > 10 * error
    np.testing.assert_array_equal(ids[..., 0][clear], case.logits.argmax(-1)[clear])
    _check_greedy(out["greedy"], case, error)


def test_llamacpp_tokenizes_like_transformers(cases):
    """The vocabulary written into the GGUF tokenizes as the HF tokenizer does."""
    case = cases("smollm2")
    texts = ["Hello world, 12345 tokens!", "  The U.S. Congress met on July 4th, 1776.\n"]
    out = _run("llamacpp", case, texts=texts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(assets.smollm2_dir()))
    for i, text in enumerate(texts):
        assert out[f"text_tokens_{i}"].tolist() == tokenizer.encode(text)


def test_llamacpp_q8_0_of_the_searched_demo_model(tmp_path):
    """q8_0 of the demo's searched 10 % model stays as close to fp32 as dense q8_0 does.

    Measured for the dense SmolLM2 in llama.cpp: q8_0 moves logits by up to 2.2 (mean 0.3). The
    bounds leave room for that and would catch a broken tensor (which moves logits by tens and
    the argmax everywhere)."""
    dense_dir = str(assets.smollm2_dir())
    model, _ = pruned_models.from_config(dense_dir, DEMO_CONFIG)
    export.export(model, str(tmp_path / "q8"), fmt="gguf", dtype="q8_0", tokenizer=dense_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    prompts = [tokenizer.encode(t)[:12] for t in TEXTS]
    ref = np.asarray(model(np.array(prompts, np.int32)))
    request = {"mode": "check", "prompts": prompts, "greedy_tokens": 4}
    out = harness.run("llamacpp", str(tmp_path / "q8" / "model.gguf"), request)
    assert np.abs(out["logits"] - ref).mean() < 0.6
    # The argmax may flip only where our top-2 logits are within q8_0's noise.
    top2 = np.sort(ref, -1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1.0
    assert clear.sum() >= 6  # 10 of the 24 positions here
    np.testing.assert_array_equal(out["logits"].argmax(-1)[clear], ref.argmax(-1)[clear])


def test_llamacpp_sentencepiece_vocabulary(tmp_path):
    """A Llama-2-style SentencePiece vocabulary: llama.cpp tokenizes as sentencepiece does."""
    import sentencepiece

    folder = serving.spm_tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    model = serving.pruned("llama_mha", vocab_size=sp.vocab_size())
    out = tmp_path / "g"
    export.export(model, str(out), fmt="gguf", tokenizer=str(folder))
    texts = ["Fellow citizens of the Senate", "and of the House of Representatives: 1789."]
    prompts = [sp.encode(t)[:5] for t in texts]
    got = harness.run(
        "llamacpp",
        str(out / "model.gguf"),
        {"mode": "check", "prompts": prompts, "greedy_tokens": 2, "texts": texts},
    )
    for i, text in enumerate(texts):
        assert got[f"text_tokens_{i}"].tolist() == sp.encode(text)
    ref = np.asarray(model(np.array(prompts, np.int32)))
    assert np.abs(got["logits"] - ref).max() < LOGIT_TOL


def test_layer_spec_cases_cover_every_workaround(cases):
    spec = cases("smollm2").model.spec
    assert not spec.layers[0].has_attn and not spec.layers[-1].has_mlp
    assert any(layer.has_attn and not layer.has_mlp for layer in spec.layers)
    heads = spec.num_attention_heads
    assert any(layer.has_attn and heads % layer.kv_groups for layer in spec.layers)
    assert LayerSpec(False, 0, False, 0) in spec.layers
