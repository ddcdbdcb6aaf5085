"""The one map between our parameter paths and Hugging Face tensor names.

Our modules carry the HF attribute names (``model.layers.3.self_attn.q_proj``), so a path maps to
its tensor name by renaming the leaf: ``kernel`` and ``embedding`` become ``weight``. Linear
kernels are stored ``[in, out]`` and HF weights ``[out, in]``, so kernels are transposed both ways;
every other tensor (embeddings, norms, biases) has the same layout in both.
"""

from __future__ import annotations

from collections.abc import Sequence

_LEAVES = {"kernel": "weight", "embedding": "weight"}


def hf_name(path: Sequence[str | int]) -> tuple[str, bool]:
    """Our parameter path (e.g. ``("model", "layers", 3, "mlp", "up_proj", "kernel")``) ->
    (HF tensor name, whether the HF tensor is the transposed kernel)."""
    *prefix, leaf = (str(p) for p in path)
    return ".".join([*prefix, _LEAVES.get(leaf, leaf)]), leaf == "kernel"
