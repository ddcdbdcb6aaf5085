"""The config class of a MultiPruner ``decilm`` export (``model_type: nemotron-nas``).

This file travels inside every ``decilm`` export; ``config.json``'s ``auto_map.AutoConfig`` points
at it, so engines that implement ``DeciLMForCausalLM`` natively (vLLM, SGLang, TensorRT-LLM) load
the folder with ``trust_remote_code=True`` and run their own modeling code. It depends on the
public ``PretrainedConfig`` of transformers only.

``block_configs`` holds one ``{"attention": {...}, "ffn": {...}}`` entry per decoder layer. Engines
read it both ways: as attributes (``block.attention.no_op``) and as dict keys
(``block["ffn"]["ffn_mult"]``); each entry and section is therefore a ``dict`` that also answers
attribute access, and stays plain JSON when the config is saved.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class BlockSection(dict):
    """A ``dict`` whose keys are also attributes; nested dicts become ``BlockSection`` too."""

    def __init__(self, entries: dict | None = None, **more):
        super().__init__()
        for key, value in {**(entries or {}), **more}.items():
            self[key] = BlockSection(value) if isinstance(value, dict) else value

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __deepcopy__(self, memo: dict) -> BlockSection:
        return BlockSection({k: _copy(v) for k, v in self.items()})


def _copy(value):
    return BlockSection(value) if isinstance(value, dict) else value


class DeciLMConfig(PretrainedConfig):
    """A Llama config plus per-layer ``block_configs`` (see the module docstring)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs):
        self.block_configs = [BlockSection(entry) for entry in block_configs or []]
        # ``rope_parameters`` says it all for transformers; the legacy keys (which mlx-lm and
        # SGLang read) are set back afterwards, so that transformers does not convert them.
        legacy = {key: kwargs.pop(key) for key in ("rope_theta", "rope_scaling") if key in kwargs}
        super().__init__(**kwargs)
        for key, value in legacy.items():
            setattr(self, key, value)
