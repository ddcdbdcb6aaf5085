"""Greedy text from an exported Hugging Face directory, loaded the way users load it (torch).

This is the last step of the demo: it proves the exported folder works in stock transformers,
outside this project, and shows the code a user needs.
"""

from __future__ import annotations

import os

from multipruner_jax.storage import remote_code

LOAD_SNIPPET = """from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)"""


def runs_our_code_only(path: str) -> bool:
    """Whether every ``.py`` file in ``path`` is our own modeling file, byte for byte (a compact
    export, untouched): then loading it with ``trust_remote_code`` runs only our code."""
    with open(remote_code.MODELING_FILE, "rb") as f:
        ours = f.read()
    name = os.path.basename(remote_code.MODELING_FILE)
    for file in sorted(os.listdir(path)):
        if file.endswith(".py"):
            with open(os.path.join(path, file), "rb") as f:
                if file != name or f.read() != ours:
                    return False
    return True


def greedy_continuation(
    path: str, prompt: str, max_new_tokens: int = 32, trust_remote_code: bool = False
) -> str:
    """The greedy continuation of ``prompt`` by the HF model in ``path`` (KV cache, fp32, CPU).

    The folder's own Python code runs only when it is our modeling file (``runs_our_code_only``)
    or ``trust_remote_code`` is set; otherwise a folder with other code is refused."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model_path={path}: no config.json; expected an HF directory")
    if max_new_tokens <= 0:
        raise ValueError(f"--max_new_tokens={max_new_tokens}: expected a positive count")
    ours = runs_our_code_only(path)
    if not ours and not trust_remote_code:
        raise ValueError(
            f"--model_path={path} holds Python code other than our modeling file; pass "
            "--trust_remote_code to run it (only for folders whose code you trust)"
        )
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
