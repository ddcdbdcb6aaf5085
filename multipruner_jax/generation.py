"""Greedy text from an exported Hugging Face directory, loaded the way users load it (torch).

This is the last step of the demo: it proves the exported folder works in stock transformers,
outside this project, and shows the code a user needs.
"""

from __future__ import annotations

import os

LOAD_SNIPPET = """from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)"""


def greedy_continuation(path: str, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of ``prompt`` by the HF model in ``path`` (KV cache, fp32, CPU)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model_path={path}: no config.json; expected an HF directory")
    if max_new_tokens <= 0:
        raise ValueError(f"--max_new_tokens={max_new_tokens}: expected a positive count")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.eval().generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
