"""Test data: the shape fields of Llama-2-7B's ``config.json``, the paper's main model.

``tests/test_surgery.py`` checks our parameter counts on it against the paper's. ``bench/`` keeps
its own copy (``bench/projection.py``), as benchmarks do not import the tests.
"""

LLAMA2_7B_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
