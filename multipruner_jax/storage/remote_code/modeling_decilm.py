"""The transformers entry point of a MultiPruner ``decilm`` export.

The model is ``modeling_multipruner.py``'s (the same file compact exports carry, which reads
``block_configs``); this subclass only ties it to the export's own config class, as transformers
requires of remote code whose config type it does not know.
"""

from .configuration_decilm import DeciLMConfig
from .modeling_multipruner import MultiPrunerForCausalLM


class DeciLMForCausalLM(MultiPrunerForCausalLM):
    """``MultiPrunerForCausalLM`` with ``config_class = DeciLMConfig``."""

    config_class = DeciLMConfig
