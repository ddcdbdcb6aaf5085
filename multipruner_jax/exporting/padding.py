"""What a serving format had to pad: zero parameters added, per layer, and the one-line report.

A serving schema that cannot express a pruned shape exactly gets zeros instead (zero query heads,
zero KV groups, zero MLP channels, a zero block where an engine needs one). Zeros leave the
model's function unchanged but cost file size and compute; every export says how much, and where.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Padding:
    """Zero parameters an export added, as ``(layer, what, parameters)`` notes."""

    notes: list[tuple[int | None, str, int]] = field(default_factory=list)

    def add(self, layer: int | None, what: str, params: int) -> None:
        """Note ``params`` zeros for ``what`` in ``layer`` (``None``: the whole model)."""
        if params:
            self.notes.append((layer, what, params))

    @property
    def params(self) -> int:
        return sum(n for _, _, n in self.notes)

    def line(self, fmt: str, model_params: int) -> str:
        """One sentence: ``decilm: exact, no padding`` or the zeros added and their layers."""
        if not self.notes:
            return f"{fmt}: exact, no zero padding"
        where = "; ".join(what if i is None else f"layer {i}: {what}" for i, what, _ in self.notes)
        share = 100.0 * self.params / model_params
        return (
            f"{fmt}: {self.params:,} zero parameters added ({share:.2f} % of the pruned model's "
            f"{model_params:,}): {where}"
        )
