"""The jitted LoRA training and evaluation steps: masked fp32 loss, exact gradient accumulation,
optax updates of the adapters only, data parallel over a mesh.

The model (with adapters from ``lora.add_adapters``) is split once into the adapter state
(``LoraParam``), the dropout keys (``LoraKeys``) and everything else, the frozen base. Gradients
are taken with respect to the adapter state alone, so nothing ever reaches the base: its arrays
are passed in, never returned. A step sums, over its micro-batches, the gradient of the summed
target NLL and the number of targets, then divides once: the mean over every counted token of the
accumulated batch, exactly what one large batch gives (up to float rounding). The dropout of
row ``r`` of micro-batch ``i`` at step ``s`` uses ``fold_in(fold_in(key(seed), s), i * rows + r)``,
so batching, accumulation and the device count never change the randomness, and a resumed run
repeats it bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from models.decoder import CausalLM
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.finetune import lora
from multipruner_jax.finetune.finetune_data import Batch
from multipruner_jax.runtime.cross_entropy import chunked_nll, output_weight
from multipruner_jax.runtime.engine import CompileCounter


def masked_nll(
    model: CausalLM, tokens: jax.Array, weights: jax.Array, token_chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Weighted NLL sum and weight sum ``(float32[], float32[])`` of ``tokens: int32[B, T]``.

    ``weights: float32[B, T]`` weighs the prediction of token ``t`` from position ``t - 1``
    (``weights[:, 0]`` is unused). Logits are computed in fp32 for ``token_chunk`` positions of
    every row at a time, and recomputed in the backward pass (``cross_entropy.chunked_nll`` with
    ``remat``), so neither ``[B, T, vocab]`` logits nor one chunk per step of the scan are kept.
    """
    h = model.hidden_states(tokens)[:, :-1]
    w = weights[:, 1:]
    w_out, tied = output_weight(model)
    total = chunked_nll(h, tokens[:, 1:], w_out, tied, token_chunk, weights=w, remat=True)
    return total, jnp.sum(w)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One optimizer step: mean target NLL, counted targets and real (non-padding) tokens."""

    loss: float
    targets: int
    tokens: int


class Trainer:
    """Adapters, optimizer state and the jitted steps of one fine-tuning run on ``mesh``.

    Rows of every batch are sharded over "data"; adapters are placed by
    ``lora.adapter_sharding``; the base keeps the sharding it was loaded with.
    """

    def __init__(
        self,
        model: CausalLM,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        *,
        seed: int,
        token_chunk: int = 128,
    ):
        if not lora.lora_layers(model):
            raise ValueError("the model has no LoRA adapters; call lora.add_adapters first")
        self.mesh = mesh
        self._counter = CompileCounter()
        lora.place_adapters(model, mesh)
        lora.set_training(model, True)
        graph_train, self.adapters, self.keys, self.frozen = nnx.split(
            model, lora.LoraParam, lora.LoraKeys, ...
        )
        lora.set_training(model, False)
        self.graph_eval = nnx.split(model, lora.LoraParam, lora.LoraKeys, ...)[0]

        def grad_fn(adapters, keys, frozen, acc, tokens, weights, step, first_row):
            step_key = jax.random.fold_in(jax.random.key(seed), step)
            rows = first_row + jnp.arange(tokens.shape[0])
            row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
            keys = jax.tree.map(lambda _: row_keys, keys)

            def loss(adapters):
                merged = nnx.merge(graph_train, adapters, keys, frozen)
                return masked_nll(merged, tokens, weights, token_chunk)

            (total, count), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
            acc_grads, acc_total, acc_count = acc
            return jax.tree.map(jnp.add, acc_grads, grads), acc_total + total, acc_count + count

        def apply_fn(adapters, opt_state, grads, count):
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
            updates, opt_state = optimizer.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state

        def eval_fn(adapters, keys, frozen, tokens, weights):
            return masked_nll(
                nnx.merge(self.graph_eval, adapters, keys, frozen), tokens, weights, token_chunk
            )

        # Eager init keeps the adapters' shardings for the moments; scalars are replicated. Fixed
        # output shardings keep every later call on the same compiled program.
        replicated = mesh_lib.replicated(mesh)
        shardings = jax.tree.map(lambda x: x.sharding, self.adapters)
        self.opt_state = jax.tree.map(
            lambda x: x if x.ndim else jax.device_put(x, replicated),
            optimizer.init(self.adapters),
        )
        opt_shardings = jax.tree.map(lambda x: x.sharding, self.opt_state)
        jit = self._counter.jit
        self._grad = jit(grad_fn, out_shardings=(shardings, replicated, replicated))
        self._apply = jit(apply_fn, out_shardings=(shardings, opt_shardings))
        self._eval = jit(eval_fn)
        self._zeros = jax.jit(
            lambda a: (jax.tree.map(jnp.zeros_like, a), jnp.zeros(()), jnp.zeros(())),
            out_shardings=(shardings, replicated, replicated),
        )

    @property
    def compiles(self) -> int:
        """Traces of the gradient, update and evaluation steps so far."""
        return self._counter.count

    def _put(self, array: np.ndarray) -> jax.Array:
        sharding = mesh_lib.rows_sharding(self.mesh, array.ndim)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _check_rows(self, batch: Batch) -> None:
        data = self.mesh.shape["data"]
        if batch.tokens.shape[0] % data:
            raise ValueError(
                f"a batch of {batch.tokens.shape[0]} rows does not split over the mesh's "
                f"data axis of {data} devices"
            )

    def step(self, micro_batches: list[Batch], step: int) -> StepResult:
        """One optimizer update from ``micro_batches`` (gradient accumulation); ``step`` (the
        number of updates before this one) seeds the dropout."""
        acc = self._zeros(self.adapters)
        first_row = 0
        for batch in micro_batches:
            self._check_rows(batch)
            acc = self._grad(
                self.adapters,
                self.keys,
                self.frozen,
                acc,
                self._put(batch.tokens),
                self._put(batch.weights),
                jnp.int32(step),
                jnp.int32(first_row),
            )
            first_row += batch.tokens.shape[0]
        grads, total, count = acc
        self.adapters, self.opt_state = self._apply(self.adapters, self.opt_state, grads, count)
        count = float(count)
        return StepResult(
            loss=float(total) / max(count, 1.0),
            targets=int(count),
            tokens=sum(b.real_tokens for b in micro_batches),
        )

    def evaluate(self, batches: list[Batch]) -> tuple[float, int]:
        """Mean target NLL over ``batches`` (no dropout) and the number of targets."""
        total, count = 0.0, 0.0
        for batch in batches:
            self._check_rows(batch)
            s, c = self._eval(
                self.adapters,
                self.keys,
                self.frozen,
                self._put(batch.tokens),
                self._put(batch.weights),
            )
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0), int(count)

    def state(self) -> dict:
        """What a checkpoint holds: ``{"adapters": ..., "opt_state": ...}``."""
        return {"adapters": self.adapters, "opt_state": self.opt_state}

    def load_state(self, state: dict) -> None:
        """Continue from a ``state()`` (restored onto the same shardings)."""
        self.adapters, self.opt_state = state["adapters"], state["opt_state"]

    def abstract_state(self) -> dict:
        """``state()`` as ``jax.ShapeDtypeStruct`` leaves with shardings (a restore target)."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state()
        )


def make_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int, kind: str = "linear"
) -> optax.Schedule:
    """Linear warm-up from 0 over ``warmup_steps``, then linear (HF Trainer's default, which the
    reference fine-tuning used) or cosine decay to 0 at ``total_steps``."""
    decay_steps = total_steps - warmup_steps
    if kind == "linear":
        decay = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps)
    else:
        raise ValueError(f"--schedule={kind!r}: expected linear or cosine")
    if not warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
    schedule: optax.Schedule, weight_decay: float = 0.0, max_grad_norm: float = 1.0
) -> optax.GradientTransformation:
    """AdamW (0.9, 0.999, 1e-8) on ``schedule`` after clipping the global gradient norm to
    ``max_grad_norm`` (0: no clipping), as HF Trainer does by default."""
    adamw = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    if max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
    return adamw
