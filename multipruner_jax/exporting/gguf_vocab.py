"""A model's vocabulary as GGUF metadata (``tokenizer.ggml.*``), read from its HF tokenizer files.

Two tokenizer kinds cover the families we prune:

* byte-level BPE (Llama-3, Qwen2, SmolLM2; ``tokenizer.json``): llama.cpp's ``gpt2`` model with
  tokens, token types and merges, plus ``tokenizer.ggml.pre``, the name of llama.cpp's pre-split
  regex. That name is read off the ``pre_tokenizer`` of ``tokenizer.json`` (``PRE_TOKENIZERS``);
  a split rule llama.cpp does not know is refused rather than silently tokenized differently.
* SentencePiece (Llama-2, Mistral; ``tokenizer.model``): llama.cpp's ``llama`` model with pieces,
  scores and types from the ``sentencepiece`` package.

Special token ids, ``add_bos``/``add_eos`` and the chat template come through ``gguf``'s own
``SpecialVocab`` reader. Ids beyond the tokenizer up to the model's vocabulary size become unused
``[PAD<id>]`` tokens, as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import gguf

TokenType = gguf.TokenType
# llama.cpp pre-tokenizer names by the split rule of ``tokenizer.json`` (see ``_split_rule``).
PRE_TOKENIZERS = {
    "bytelevel": "gpt-2",  # GPT-2's regex inside ByteLevel
    "digits+bytelevel": "smollm",  # each digit apart, then GPT-2's regex
    r"split:\p{N}{1,3}+bytelevel": "llama-bpe",  # Llama-3's regex: numbers in runs of 3
    r"split:\p{N}+bytelevel": "qwen2",  # Qwen2's regex: single digits
}


class VocabError(ValueError):
    """Tokenizer files that cannot be written as a GGUF vocabulary."""


@dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` holds, ready to add to a ``GGUFWriter``."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def read(tokenizer: Any, vocab_size: int) -> Vocab:
    """The vocabulary of ``tokenizer`` (a tokenizer folder, or an object with
    ``save_pretrained``) for a model with ``vocab_size`` embedding rows."""
    if tokenizer is None:
        raise VocabError(
            "the gguf format needs the model's tokenizer files (tokenizer.json or "
            "tokenizer.model) to write its vocabulary, and none were given"
        )
    if not isinstance(tokenizer, str | os.PathLike):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return read(tmp, vocab_size)
    folder = str(tokenizer)
    if os.path.isfile(os.path.join(folder, "tokenizer.model")):
        return _sentencepiece(folder, vocab_size)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return _bpe(folder, vocab_size)
    raise VocabError(
        f"{folder}: no tokenizer.json or tokenizer.model; the gguf format needs one to write "
        "the vocabulary"
    )


def _pad(tokens: dict[int, str], types: dict[int, int], vocab_size: int, folder: str):
    if tokens and max(tokens) >= vocab_size:
        raise VocabError(
            f"{folder}: the tokenizer has token id {max(tokens)}, but the model has only "
            f"{vocab_size} embedding rows"
        )
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, TokenType.UNUSED) for i in range(vocab_size)]
    return names, [int(k) for k in kinds]


def _split_rule(pre: dict[str, Any] | None) -> str:
    """A short signature of ``tokenizer.json``'s pre-tokenizer (``PRE_TOKENIZERS`` keys)."""
    if pre is None:
        return "none"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    parts = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            parts.append("bytelevel" if step.get("use_regex", True) else "bytelevel-raw")
        elif kind == "Digits" and step.get("individual_digits"):
            parts.append("digits")
        elif kind == "Split":
            regex = (step.get("pattern") or {}).get("Regex", "")
            digits = r"\p{N}{1,3}" if r"\p{N}{1,3}" in regex else r"\p{N}"
            parts.append(f"split:{digits}")
        else:
            parts.append(str(kind).lower())
    signature = "+".join(parts)
    # After a Split that already applied the regex, ByteLevel only maps bytes.
    return signature.replace("+bytelevel-raw", "+bytelevel")


def _bpe(folder: str, vocab_size: int) -> Vocab:
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise VocabError(f"{path}: not a readable tokenizer.json ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise VocabError(
            f"{path}: a {model.get('type')} tokenizer"
            f"{' with byte fallback' if model.get('byte_fallback') else ''} needs its "
            "SentencePiece tokenizer.model beside it for the gguf format"
        )
    rule = _split_rule(data.get("pre_tokenizer"))
    if rule not in PRE_TOKENIZERS:
        raise VocabError(
            f"{path}: llama.cpp has no pre-tokenizer known to match this tokenizer's split rule "
            f"({rule}); the gguf format supports {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    tokens = {int(i): tok for tok, i in model["vocab"].items()}
    types = {i: TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        i = int(added["id"])
        tokens[i] = added["content"]
        types[i] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    names, kinds = _pad(tokens, types, vocab_size, folder)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise VocabError(f"{path}: a BPE tokenizer without merges cannot be written to gguf")
    return Vocab("gpt2", PRE_TOKENIZERS[rule], names, kinds, None, special)


def _sentencepiece(folder: str, vocab_size: int) -> Vocab:
    import sentencepiece

    path = os.path.join(folder, "tokenizer.model")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise VocabError(f"{path}: not a readable SentencePiece model ({e})") from None
    tokens, types, scores = {}, {}, {}
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        kinds = (
            (sp.is_unknown, TokenType.UNKNOWN),
            (sp.is_control, TokenType.CONTROL),
            (sp.is_unused, TokenType.UNUSED),
            (sp.is_byte, TokenType.BYTE),
        )
        types[i] = next((kind for test, kind in kinds if test(i)), TokenType.NORMAL)
    added = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(added):
        with open(added, encoding="utf-8") as f:
            for entry in json.load(f).get("added_tokens", []):
                i = int(entry["id"])
                if i >= sp.vocab_size():
                    tokens[i], scores[i] = entry["content"], -1000.0
                    types[i] = TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED
    names, kinds = _pad(tokens, types, vocab_size, folder)
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    score_list = [float(scores.get(i, -1000.0)) for i in range(vocab_size)]
    return Vocab("llama", "default", names, kinds, score_list, special)
