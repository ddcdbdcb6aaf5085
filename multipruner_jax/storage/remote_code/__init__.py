"""The modeling file that compact exports carry, and the ``config.json`` keys that register it.

``modeling_multipruner.py`` (next to this file) is copied verbatim into every compact export; it
imports only torch and transformers, so this package never imports it.
"""

from __future__ import annotations

import os
from typing import Any

from models.spec import ModelSpec

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_multipruner.py")
MODEL_CLASS = "MultiPrunerForCausalLM"
LAYERS_KEY = "multipruner_layers"


def config_additions(spec: ModelSpec) -> dict[str, Any]:
    """The keys a compact export adds to the dense ``config.json`` of ``spec``'s family.

    ``auto_map`` points ``AutoModelForCausalLM`` at the modeling file; ``multipruner_layers``
    lists, per layer, its query heads, KV heads and MLP width (0: the block was removed).
    """
    layers = [
        {
            "num_attention_heads": layer.kv_groups * spec.q_per_kv if layer.has_attn else 0,
            "num_key_value_heads": layer.kv_groups if layer.has_attn else 0,
            "intermediate_size": layer.mlp_width if layer.has_mlp else 0,
        }
        for layer in spec.layers
    ]
    module = os.path.splitext(os.path.basename(MODELING_FILE))[0]
    return {"auto_map": {"AutoModelForCausalLM": f"{module}.{MODEL_CLASS}"}, LAYERS_KEY: layers}
