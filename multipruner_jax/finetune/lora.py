"""LoRA adapters on a (pruned) ``CausalLM``: insertion, adapter-input dropout, sharding, merging.

``add_adapters`` replaces each targeted ``nnx.Linear`` of every surviving block (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``) by a ``LoraLinear``
that holds the frozen base layer plus ``lora_a: float32[in, rank]`` and ``lora_b: float32[rank,
out]`` as ``LoraParam`` variables, a type of its own, so that ``nnx.split(model, LoraParam, ...)``
separates what is trained from the frozen base. A removed block has no layers, so no adapters;
every adapter takes its layer's own (pruned) shape. The layer computes

    y = base(x) + scale * dropout(x) @ A @ B,   scale = alpha / rank

with the adapter path in float32 whatever the base dtype (its result is cast to the base output's
dtype). ``B`` starts at zero, so a fresh adapter leaves the model's function unchanged; ``A`` is
uniform in ``±1/sqrt(in)`` (PEFT's default). Dropout on the adapter input draws its mask from
per-row keys that the training step supplies (``LoraKeys``), so a step's randomness depends only
on the seed, the step and the row, never on batching or devices. ``merge`` folds the adapters
into the base kernels, ``W + scale * A @ B``, and gives back the original module structure.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.decoder import CausalLM

# Short target name -> (block attribute, projection attribute, kernel axis split on "model").
TARGETS = {
    "q": ("self_attn", "q_proj", 1),
    "k": ("self_attn", "k_proj", 1),
    "v": ("self_attn", "v_proj", 1),
    "o": ("self_attn", "o_proj", 0),
    "gate": ("mlp", "gate_proj", 1),
    "up": ("mlp", "up_proj", 1),
    "down": ("mlp", "down_proj", 0),
}


class LoraParam(nnx.Variable):
    """A trained adapter matrix (``lora_a`` or ``lora_b``), always float32."""


class LoraKeys(nnx.Variable):
    """Per-row PRNG keys ``key[batch]`` of the adapter-input dropout, set by each training step."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter rank, ``alpha`` (scale = alpha / rank), dropout rate and target projections."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = tuple(TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        """Raise ``ValueError`` naming the bad setting."""
        if self.rank < 1:
            raise ValueError(f"--lora_rank={self.rank}: expected a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora_dropout={self.dropout}: expected a rate in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"--lora_targets={','.join(self.targets)}: expected a non-empty subset of "
                f"{','.join(TARGETS)}"
            )


class LoraLinear(nnx.Module):
    """A frozen ``nnx.Linear`` plus a LoRA adapter; see the module docstring."""

    def __init__(self, base: nnx.Linear, config: LoraConfig, index: int, seed: int):
        din, dout = base.kernel[...].shape
        bound = 1.0 / din**0.5
        a = np.random.default_rng([seed, index]).uniform(-bound, bound, (din, config.rank))
        self.base = base
        self.lora_a = LoraParam(jnp.asarray(a, jnp.float32))
        self.lora_b = LoraParam(jnp.zeros((config.rank, dout), jnp.float32))
        self.keys = LoraKeys(jax.random.split(jax.random.key(0), 1))
        self.scale = config.scale
        self.rate = config.dropout
        self.index = index
        self.training = False

    def delta(self, x: jax.Array) -> jax.Array:
        """The adapter's output ``float32[..., out]`` for ``x: [batch, ..., in]``."""
        h = x.astype(jnp.float32)
        if self.training and self.rate > 0.0:

            def keep(key, row):
                return jax.random.bernoulli(
                    jax.random.fold_in(key, self.index), 1 - self.rate, row.shape
                )

            h = jnp.where(jax.vmap(keep)(self.keys[...], h), h / (1.0 - self.rate), 0.0)
        return (h @ self.lora_a[...]) @ self.lora_b[...] * self.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [batch, seq, in]`` -> ``[batch, seq, out]`` in the base layer's dtype."""
        y = self.base(x)
        return y + self.delta(x).astype(y.dtype)


def _targets(model: CausalLM, targets: tuple[str, ...]):
    """``(block, projection attribute)`` of every targeted layer."""
    for layer in model.model.layers:
        for name in targets:
            block_attr, proj_attr, _ = TARGETS[name]
            block = getattr(layer, block_attr)
            if block is not None:
                yield block, proj_attr


def add_adapters(model: CausalLM, config: LoraConfig, seed: int = 0) -> int:
    """Wrap every targeted projection of ``model`` in place; returns how many were wrapped.

    ``A`` of the n-th wrapped layer (layer order, then ``config.targets`` order) is drawn on the
    host by ``numpy.random.default_rng([seed, n])``.
    """
    config.check()
    count = 0
    for block, attr in _targets(model, config.targets):
        base = getattr(block, attr)
        if isinstance(base, LoraLinear):
            raise ValueError("the model already has LoRA adapters")
        setattr(block, attr, LoraLinear(base, config, count, seed))
        count += 1
    return count


def lora_layers(model: CausalLM) -> list[LoraLinear]:
    """Every ``LoraLinear`` of ``model`` in adapter order."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, LoraLinear)]


def set_training(model: CausalLM, training: bool) -> None:
    """Turn the adapter-input dropout on (training graph) or off (evaluation, merging)."""
    for layer in lora_layers(model):
        layer.training = training


def adapter_sharding(mesh: Mesh, path: str, shape: tuple[int, ...]) -> NamedSharding:
    """Shard an adapter like its base kernel: ``lora_b`` of q/k/v/gate/up on its output axis,
    ``lora_a`` of o/down on its input axis, over "model" where that divides; else replicated."""
    model_size = mesh.shape["model"]
    for _, proj, axis in TARGETS.values():
        sharded = f"{proj}.lora_b" if axis == 1 else f"{proj}.lora_a"
        if path.endswith(sharded) and model_size > 1 and shape[axis] % model_size == 0:
            spec = [None, None]
            spec[axis] = "model"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def place_adapters(model: CausalLM, mesh: Mesh) -> None:
    """Move every adapter matrix onto its ``adapter_sharding`` in place."""
    for path, var in nnx.to_flat_state(nnx.state(model, LoraParam)):
        name = ".".join(map(str, path))
        value = var.get_value()
        var.set_value(jax.device_put(value, adapter_sharding(mesh, name, value.shape)))


def merge(model: CausalLM) -> CausalLM:
    """Fold every adapter into its base kernel (in float32, then cast to the kernel's dtype) and
    put the plain ``nnx.Linear`` back, in place; returns ``model`` with its original structure."""
    for block, attr in _targets(model, tuple(TARGETS)):
        layer = getattr(block, attr)
        if not isinstance(layer, LoraLinear):
            continue
        kernel = layer.base.kernel[...]
        update = jnp.matmul(
            layer.lora_a[...], layer.lora_b[...], precision=jax.lax.Precision.HIGHEST
        )
        folded = kernel.astype(jnp.float32) + layer.scale * update
        layer.base.kernel[...] = folded.astype(kernel.dtype)
        setattr(block, attr, layer.base)
    return model
