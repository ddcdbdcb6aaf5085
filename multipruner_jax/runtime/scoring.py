"""Perplexity scoring: masked candidates on fixed token rows, in waves over the mesh's candidate
axis, with the prefix cache.

Protocol (the reference's ``evaluate_ppl``): logits at positions ``0..T-2`` predict tokens
``1..T-1``; tokens equal to ``ignore_id`` are not counted; each row's mean NLL is taken over its
counted targets; perplexity is ``exp`` of the mean of the row means.

The forward is the per-layer engine (``engine``): one program per distinct layer graph, so a
rebuilt model after a removal only compiles the layers whose shape is new. Each call scores a
*wave*: one masked model per group of devices on the mesh's "candidate" axis (``shard_map`` over
that axis; rows stay on "data", heads and channels on "model"). A slot may start at a later layer
from the prefix cache (``PrefixCache`` keeps each layer's input for the current model); a group
skips (``lax.cond``) the layers below its slot's start, an empty slot skips everything, and a
block that a mask switches off is skipped inside the layer (or computed and discarded where
groups must not branch; see ``Scorer``). The rows and their batches are ``rows.Rows``; the NLL is
``cross_entropy.chunked_nll``.

Masks are always traced inputs, so all candidates of a search step reuse the compiled programs.
Every program output is replicated or sharded over the whole mesh, so all of this also runs when
the mesh spans several processes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import masks as masks_lib
from models.decoder import CausalLM
from models.masks import LayerMasks, Masks
from models.spec import ModelSpec
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.runtime.cross_entropy import chunked_nll
from multipruner_jax.runtime.engine import CompileCounter, Engine, PartFns
from multipruner_jax.runtime.inflight import InFlight
from multipruner_jax.runtime.rows import Rows

EMPTY = np.iinfo(np.int32).max  # the first layer of an empty slot: it computes nothing
FROM_INPUT = -1  # the first layer of a slot that starts from its own embedded tokens


def head_nll(
    h: jax.Array,
    w_out: jax.Array,
    tied: bool,
    tokens: jax.Array,
    ignore_id: int,
    token_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sums and target counts ``(float32[B], float32[B])`` of the reference protocol.

    ``h: [B, T, D]`` final-normed hidden states; ``w_out``, ``tied``: see
    ``cross_entropy.output_weight``; ``tokens: int32[B, T]``; ``ignore_id < 0`` counts every
    target. Logits exist ``token_chunk`` positions at a time (``cross_entropy.chunked_nll``).
    """
    b, t, d = h.shape
    nll, _ = chunked_nll(
        h[:, :-1].reshape(-1, d), tokens[:, 1:].reshape(-1), w_out, tied, token_chunk
    )
    nll = nll.reshape(b, t - 1)
    counted = (tokens[:, 1:] != ignore_id).astype(jnp.float32)
    return (nll * counted).sum(axis=1), counted.sum(axis=1)


def prefix_cache_bytes(spec: ModelSpec, rows: int, seq_len: int, dtype: jnp.dtype) -> int:
    """Bytes a ``PrefixCache`` holds: every layer's input for every row."""
    return rows * seq_len * spec.hidden_size * spec.num_layers * jnp.dtype(dtype).itemsize


@dataclass(frozen=True)
class PrefixCache:
    """Every layer input of one model: ``inputs[batch][layer]: [B, T, D]`` (on every candidate
    group of devices)."""

    model: CausalLM
    inputs: list[list[jax.Array]]


class Slot(NamedTuple):
    """One candidate in a wave: its masks on the current model, and the first layer computed
    (0, or a layer whose cached input is used; the masks leave every layer below it unchanged)."""

    masks: Masks
    start: int = 0


class Scorer:
    """Scores masked models on fixed token rows ``tokens: int32[rows, seq]`` (``self.rows``, in
    batches of ``batch_size`` on the mesh's "data" axis), up to ``candidates`` of them (the
    mesh's "candidate" axis) side by side in one *wave*: each candidate group of devices runs one.

    ``skip_off_blocks``: whether a block that a mask switches off is skipped (``lax.cond``) or
    computed and discarded (benchmarks measure what skipping saves). Where several candidate
    groups share a "model" axis, groups compute what they would skip (also a slot's layers below
    its start) and discard it: groups that disagree on a branch holding a collective deadlock
    XLA:CPU (its collective permutes wait for every device of the program). Groups run in lock
    step, so on accelerators that costs no time; on CPU, where fake devices share the cores,
    skipping saves time. ``compiles`` counts the traces of the scoring programs.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        ignore_id: int | None,
        batch_size: int = 1,
        mesh: Mesh | None = None,
        token_chunk: int = 512,
        skip_off_blocks: bool = True,
    ):
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh((1, 1))
        self.rows = Rows(tokens, ignore_id=ignore_id, batch_size=batch_size, mesh=self.mesh)
        self.candidates = self.mesh.shape["candidate"]
        self.token_chunk = token_chunk
        self._branch = self.candidates == 1 or self.mesh.shape["model"] == 1
        self.skip_off_blocks = self._branch and skip_off_blocks
        self._inputs = _WaveInputs(self.mesh, self.rows)
        waves = self._inputs.waves
        fns = PartFns(
            self._embed_fn,
            self._layer_fn,
            self._head_fn,
            embed_out=waves,
            layer_out=waves,
            head_out=mesh_lib.replicated(self.mesh),
        )
        self._engine = Engine(fns, self.mesh)
        # Slot ``k`` of a wave's activations ``[B, T, D]``, on every candidate group.
        self._pick = jax.jit(lambda h, k: h[k], out_shardings=mesh_lib.rows_sharding(self.mesh, 3))

    @property
    def compiles(self) -> CompileCounter:
        """Traces of the scoring programs so far (``compiles.count``)."""
        return self._engine.compiles

    # -- the parts of a wave, traced once per program ------------------------------------------

    def _embed_fn(self, graphdef, state, tokens):
        """Every slot's embedded tokens: ``int32[C, B, T] -> [C, B, T, D]``."""

        def slot(state, tokens):
            return nnx.merge(graphdef, state)(tokens[0])[None]

        return self._per_slot(slot, (P(), P("candidate")))(state, tokens)

    def _per_slot(self, fn: Callable, in_specs: tuple) -> Callable:
        """``fn`` run by each candidate group on its own slot (leading axis of size 1 there)."""
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=P("candidate"),
            axis_names={"candidate"},
            check_vma=False,
        )

    def _layer_fn(self, graphdef, state, h, entry, cos, sin, masks, starts, index):
        """Layer ``index`` for every slot: a slot whose first layer is ``index`` takes ``entry``
        as its input; slots that start later (or are empty) skip the layer; slots that start at
        ``FROM_INPUT`` use their own ``h`` throughout."""

        def slot(state, h, entry, cos, sin, masks, start, index):
            layer = nnx.merge(graphdef, state)
            own = LayerMasks(*(m[0, index] for m in masks))
            h = jnp.where(index == start[0], entry, h[0])

            def run(h):
                return layer(h, cos, sin, own, skip_off=self.skip_off_blocks)

            return self._unless(index >= start[0], run, h)[None]

        specs = (P(), P("candidate"), P(), P(), P(), P("candidate"), P("candidate"), P())
        return self._per_slot(slot, specs)(state, h, entry, cos, sin, masks, starts, index)

    def _head_fn(self, graphdef, tied, state, w_out, h, tokens, starts):
        """Per-row NLL sums of every occupied slot (zeros for empty ones)."""
        ignore_id = self.rows.ignore_id

        def slot(state, w_out, h, tokens, start):
            norm = nnx.merge(graphdef, state)

            def nll(h):
                return head_nll(norm(h), w_out, tied, tokens, ignore_id, self.token_chunk)[0]

            def empty(h):
                return jnp.zeros(h.shape[:1], jnp.float32)

            if self._branch:
                return jax.lax.cond(start[0] < EMPTY, nll, empty, h[0])[None]
            return jnp.where(start[0] < EMPTY, nll(h[0]), 0.0)[None]

        specs = (P(), P(), P("candidate"), P(), P("candidate"))
        return self._per_slot(slot, specs)(state, w_out, h, tokens, starts)

    def _unless(self, run: jax.Array, fn: Callable, h: jax.Array) -> jax.Array:
        """``fn(h)`` when the scalar ``run`` holds, else ``h``: skipped, or computed and
        discarded when groups must not branch."""
        if self._branch:
            return jax.lax.cond(run, fn, lambda h: h, h)
        return jnp.where(run, fn(h), h)

    # -- perplexity ---------------------------------------------------------------------------

    def row_nll(
        self,
        model: CausalLM,
        masks: Masks | None = None,
        cache: PrefixCache | None = None,
        start: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row NLL sums and counts ``(float64[rows], float64[rows])`` of ``model``.

        ``start`` > 0: begin at layer ``start`` from ``cache``, the prefix cache of this same
        model; the masks must leave every layer below it unchanged.
        """
        if masks is None:
            masks = masks_lib.ones(model.spec)
        slot = Slot(masks, start)
        sums = np.concatenate(
            [self.wave(model, [slot], b, cache)[0] for b in range(len(self.rows))]
        )
        return sums, self.rows.counts.copy()

    def perplexity(
        self,
        model: CausalLM,
        masks: Masks | None = None,
        cache: PrefixCache | None = None,
        start: int = 0,
    ) -> float:
        """``exp(mean_rows(row_nll_sum / row_count))``; see the module docstring."""
        self.rows.check_counted()
        sums, counts = self.row_nll(model, masks, cache, start)
        return float(np.exp(np.mean(sums / counts)))

    def wave(
        self,
        model: CausalLM,
        slots: Sequence[Slot | None],
        batch: int,
        cache: PrefixCache | None = None,
    ) -> np.ndarray:
        """Row NLL sums ``float64[candidates, real rows of the batch]`` of up to ``candidates``
        masked models on batch ``batch``; row ``k`` is slot ``k`` (zeros for ``None`` slots).

        Starts after layer 0 need ``cache`` (the prefix cache of ``model``).
        """
        if len(slots) > self.candidates:
            raise ValueError(f"{len(slots)} slots for a candidate axis of {self.candidates}")
        if cache is not None and cache.model is not model:
            raise ValueError("the prefix cache belongs to another model")
        if cache is None and any(s.start for s in slots if s is not None):
            raise ValueError("a slot that starts after layer 0 needs the prefix cache")
        out = self._layer_wave(model, list(slots), batch, cache)
        real = self.rows.spans[batch]
        return np.asarray(out, np.float64)[: len(slots), : len(real)]

    # -- waves --------------------------------------------------------------------------------

    def prefix_cache(self, model: CausalLM) -> PrefixCache:
        """Run ``model`` (unmasked) once and keep every layer's input, per batch.

        Each candidate group computes the inputs of its own batches (one batch per group and
        wave) with the very programs that score candidates, and every group receives a copy, so
        a candidate started from the cache computes exactly what it would from layer 0.
        """
        parts, place = self._engine.parts(model), self._inputs
        cos, sin = parts.rope(self.rows.seq_len)
        n_batches, c = len(self.rows), self.candidates
        inputs: list[list[jax.Array]] = [[] for _ in range(n_batches)]
        in_flight = InFlight()
        for first in range(0, n_batches, c):
            batches = list(range(first, min(first + c, n_batches)))
            slots = [Slot(masks_lib.ones(model.spec), FROM_INPUT)] * len(batches)
            masks, starts = place.slots(model.spec, slots)
            h = parts.embed(place.tokens(batches))
            entry = place.zeros(h.shape[1:], h.dtype, place.rows_3d)
            for i, layer in enumerate([None, *parts.layers[:-1]]):
                if layer is not None:
                    args = (cos, sin, masks, starts, place.index(i - 1))
                    h = in_flight.add(layer(h, entry, *args))
                for k, batch in enumerate(batches):
                    inputs[batch].append(in_flight.add(self._pick(h, place.index(k))))
        return PrefixCache(model, inputs)

    def _layer_wave(
        self, model: CausalLM, slots: list[Slot | None], batch: int, cache: PrefixCache | None
    ) -> jax.Array:
        parts, place = self._engine.parts(model), self._inputs
        cos, sin = parts.rope(self.rows.seq_len)
        if cache is None:  # every slot embeds the batch itself and starts from it
            slots = [None if s is None else s._replace(start=FROM_INPUT) for s in slots]
            h = parts.embed(place.tokens([batch]))
        masks, starts = place.slots(model.spec, slots)
        first = max(0, min(s.start for s in slots if s is not None))
        in_flight = InFlight()
        for i in range(first, len(parts.layers)):
            if cache is None:
                entry = place.zeros(h.shape[1:], h.dtype, place.rows_3d)
            else:
                entry = cache.inputs[batch][i]
                if i == first:
                    h = place.zeros((self.candidates, *entry.shape), entry.dtype, place.waves)
            args = (cos, sin, masks, starts, place.index(i))
            h = in_flight.add(parts.layers[i](h, entry, *args))
        return parts.head(h, self.rows.batches[batch], starts)


class _WaveInputs:
    """A wave's inputs, placed on the mesh: each slot's tokens, masks and first layer on the
    candidate axis; layer indices and all-zero inputs, made once each."""

    def __init__(self, mesh: Mesh, rows: Rows):
        self.rows = rows
        self.candidates = mesh.shape["candidate"]
        self.waves = NamedSharding(mesh, P("candidate", "data"))  # [C, B, ...]
        self.rows_3d = mesh_lib.rows_sharding(mesh, 3)  # [B, T, D] on every candidate group
        self._slots = NamedSharding(mesh, P("candidate"))
        self._replicated = mesh_lib.replicated(mesh)
        self._indices: dict[int, jax.Array] = {}
        self._zeros: dict[tuple, jax.Array] = {}

    def index(self, i: int) -> jax.Array:
        """The replicated scalar ``int32`` ``i``."""
        if i not in self._indices:
            self._indices[i] = mesh_lib.global_array(np.asarray(i, np.int32), self._replicated)
        return self._indices[i]

    def zeros(self, shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.Array:
        """An all-zero array (inputs that no slot reads)."""
        key = (shape, jnp.dtype(dtype), sharding.spec)
        if key not in self._zeros:
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            self._zeros[key] = zeros()
        return self._zeros[key]

    def tokens(self, batches: list[int]) -> jax.Array:
        """``int32[C, B, T]``: batch ``batches[k]`` for slot ``k`` (the last one repeated)."""
        batches = batches + batches[-1:] * (self.candidates - len(batches))
        stacked = np.stack([self.rows.host(i) for i in batches])
        return mesh_lib.global_array(stacked, self.waves)

    def slots(self, spec: ModelSpec, slots: list[Slot | None]) -> tuple[Masks, jax.Array]:
        """Masks ``[C, ...]`` and first layers ``int32[C]`` of the slots, on the candidate axis
        (empty slots: all-on masks, first layer ``EMPTY``)."""
        slots = slots + [None] * (self.candidates - len(slots))
        ones = masks_lib.ones(spec)
        masks = [ones if s is None else s.masks for s in slots]
        stacked = Masks(*(np.stack([np.asarray(m[k]) for m in masks]) for k in range(4)))
        starts = np.asarray([EMPTY if s is None else s.start for s in slots], np.int32)
        place = functools.partial(mesh_lib.global_array, sharding=self._slots)
        return Masks(*(place(m) for m in stacked)), place(starts)
