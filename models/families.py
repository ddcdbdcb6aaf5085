"""The model families we read and write, as one table of their HF ``config.json`` dialects.

Every family runs on the one Llama-style decoder; they differ only in how their ``config.json``
spells a few switches, and this table is the one place that says how:

* ``biases``: where the attention projections' biases come from. ``"attention_bias"``: that key
  gives all four (q, k, v, o) a bias or none; ``"qkv"``: q, k and v always have one, o never
  (Qwen2, whatever the key says); ``"none"``: never (Mistral).
* ``qk_norm``: RMSNorms on queries and keys per head (Qwen3).
* ``window``: how a sliding attention window is switched on. ``None``: the family has none (the
  key is ignored, as transformers ignores it); ``"sliding_window"``: that key alone (Mistral);
  ``"use_sliding_window"``: the window applies only when that key is true (Qwen2/Qwen3), and a
  written config also gives every layer the window in ``max_window_layers``/``layer_types``.
* ``constants``: keys a written config carries with fixed values.

``models/spec.py`` reads and writes configs through this table. The torch modeling file that
compact exports carry (``multipruner_jax/storage/remote_code/modeling_multipruner.py``) cannot
import this package, so it keeps a small copy of the same rules; ``tests/test_remote_code.py``
checks that the two agree. The README's "Adding a family" lists every other table a new family
joins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Family:
    """How one HF ``model_type`` writes what our decoder needs."""

    architecture: str  # config.json "architectures"
    biases: Literal["attention_bias", "qkv", "none"]
    qk_norm: bool = False
    window: Literal["sliding_window", "use_sliding_window"] | None = None
    constants: dict[str, Any] = field(default_factory=dict)

    def read_biases(self, cfg: dict[str, Any]) -> tuple[bool, bool]:
        """``(q/k/v bias, o bias)`` of a ``config.json`` dict of this family."""
        if self.biases == "qkv":
            return True, False
        if self.biases == "none":
            return False, False
        bias = bool(cfg.get("attention_bias", False))
        return bias, bias

    def read_window(self, cfg: dict[str, Any]) -> int | None:
        """The sliding window of a ``config.json`` dict of this family (``None``: full causal)."""
        if self.window is None:
            return None
        if self.window == "use_sliding_window" and not cfg.get("use_sliding_window", False):
            return None
        window = cfg.get("sliding_window")
        return int(window) if window else None

    def write_keys(self, qkv_bias: bool, window: int | None, layers: int) -> dict[str, Any]:
        """The family's own ``config.json`` keys for these switches (window keys, bias key,
        constants, in that order). Switches the family cannot express are left out: the
        caller reads the config back to find them."""
        keys: dict[str, Any] = {}
        if self.window == "sliding_window":
            keys["sliding_window"] = window
        elif self.window == "use_sliding_window":
            sliding = window is not None
            keys["use_sliding_window"] = sliding
            keys["sliding_window"] = window
            # Our decoder applies the window to every layer, so every layer is a window layer.
            keys["max_window_layers"] = 0 if sliding else layers
            keys["layer_types"] = [("sliding_attention" if sliding else "full_attention")] * layers
        if self.biases == "attention_bias":
            keys["attention_bias"] = qkv_bias
        return {**keys, **self.constants}


FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM", "attention_bias", constants={"mlp_bias": False, "pretraining_tp": 1}
    ),
    "mistral": Family("MistralForCausalLM", "none", window="sliding_window"),
    "qwen2": Family("Qwen2ForCausalLM", "qkv", window="use_sliding_window"),
    "qwen3": Family(
        "Qwen3ForCausalLM", "attention_bias", qk_norm=True, window="use_sliding_window"
    ),
}
