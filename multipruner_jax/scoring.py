"""Perplexity scoring: jitted masked forward + chunked fp32 cross-entropy over fixed token windows.

Protocol (the reference's ``evaluate_ppl``): logits at positions ``0..T-2`` predict tokens
``1..T-1``; tokens equal to ``ignore_id`` are not counted; each row's mean NLL is taken over its
counted targets; perplexity is ``exp`` of the mean of the row means.

Two execution modes share the same pure pieces (embed, decoder layer, head NLL):

* ``"model"``: one ``jax.jit`` of the whole ``(params, masks, tokens) -> nll_sums``; it compiles
  once per set of parameter shapes.
* ``"layer"``: a host loop over per-layer jitted calls, compiled once per distinct layer shape, so
  a rebuilt model after a removal only compiles the layers whose shape is new. Each call scores a
  *wave*: one masked model per group of devices on the mesh's "candidate" axis (``shard_map``
  over that axis; rows stay on "data", heads and channels on "model"). A slot may start at a
  later layer from the prefix cache (``PrefixCache`` keeps each layer's input for the current
  model); a group skips (``lax.cond``) the layers below its slot's start, an empty slot skips
  everything, and a block that a mask switches off is skipped inside the layer.

Masks are always traced inputs, so all candidates of a search step reuse the compiled programs.
Every program output is replicated or sharded over the whole mesh, so all of this also runs when
the mesh spans several processes.
"""

from __future__ import annotations

import contextlib
import functools
import math
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
from models.decoder import CausalLM, computing_off_blocks
from models.masks import LayerMasks, Masks
from models.spec import ModelSpec
from multipruner_jax import mesh as mesh_lib
from multipruner_jax.inflight import InFlight

MODES = ("layer", "model")
EMPTY = np.iinfo(np.int32).max  # the first layer of an empty slot: it computes nothing
FROM_INPUT = -1  # the first layer of a slot that starts from its own embedded tokens


class CompileCounter:
    """Counts traces of the scoring functions (each trace is followed by one compilation)."""

    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1


def target_nll(
    h: jax.Array,
    targets: jax.Array,
    w_out: jax.Array,
    tied: bool,
    token_chunk: int,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """``-log p(target)`` at each of ``n`` positions, ``float32[n]``, from hidden states
    ``h: [n, D]`` and ``targets: int32[n]``, computing fp32 logits ``token_chunk`` positions at
    a time; with ``greedy`` also whether each target is the argmax, ``bool[n]`` (else None).

    ``w_out``: the embedding ``[V, D]`` when ``tied``, else the LM head kernel ``[D, V]``, used
    in place (never transposed).
    """
    n, d = h.shape
    token_chunk = min(token_chunk, n)
    chunks = math.ceil(n / token_chunk)
    pad = chunks * token_chunk - n
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(chunks, token_chunk, d)
    ts = jnp.pad(targets, (0, pad)).reshape(chunks, token_chunk)
    contract = 1 if tied else 0

    def body(_, chunk):
        h_c, t_c = chunk
        logits = jax.lax.dot_general(
            h_c, w_out, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
        nll = lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return None, (nll, jnp.argmax(logits, axis=-1) == t_c) if greedy else nll

    _, out = jax.lax.scan(body, None, (hs, ts))
    if greedy:
        return out[0].reshape(-1)[:n], out[1].reshape(-1)[:n]
    return out.reshape(-1)[:n], None


def head_nll(
    h: jax.Array,
    w_out: jax.Array,
    tied: bool,
    tokens: jax.Array,
    ignore_id: int,
    token_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sums and target counts, computing fp32 logits ``token_chunk`` positions at a
    time so that ``[batch, seq, vocab]`` logits never exist at once.

    ``h: [B, T, D]`` final-normed hidden states; ``w_out``: the embedding ``[V, D]`` when
    ``tied``, else the LM head kernel ``[D, V]``, used in place (never transposed);
    ``tokens: int32[B, T]``; ``ignore_id < 0``
    counts every target. Returns ``(float32[B], float32[B])``.
    """
    b, t, d = h.shape
    nll, _ = target_nll(
        h[:, :-1].reshape(-1, d), tokens[:, 1:].reshape(-1), w_out, tied, token_chunk
    )
    nll = nll.reshape(b, t - 1)
    counted = (tokens[:, 1:] != ignore_id).astype(jnp.float32)
    return (nll * counted).sum(axis=1), counted.sum(axis=1)


def output_weight(model: CausalLM) -> tuple[jax.Array, bool]:
    """The LM head weight as stored (embedding ``[V, D]`` if tied, else ``[D, V]``), and tied."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...], True
    return model.lm_head.kernel[...], False


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


@dataclass(frozen=True)
class _Bound:
    """A jitted program with its leading arguments (parameter state, ...) already given."""

    program: Callable
    args: tuple

    def __call__(self, *args):
        return self.program(*self.args, *args)


@dataclass(frozen=True)
class _Parts:
    """One model as layer-mode programs: ``embed(tokens: [C, B, T]) -> h: [C, B, T, D]``,
    ``layers[i](h, entry, cos, sin, masks, starts, i) -> h: [C, B, T, D]`` and
    ``head(h, tokens, starts) -> nll_sums: [C, B]``."""

    model: CausalLM
    embed: _Bound
    layers: list[_Bound]
    head: _Bound
    cos: jax.Array
    sin: jax.Array


class _Programs:
    """Jitted functions bound to their NNX graph, one per distinct (function, graph, statics).

    Binding the graph means per-call dispatch never hashes a graph (host work that rivals a small
    layer). Graphs are matched by equality: equal NNX graphs can hash differently (metadata
    order)."""

    def __init__(self) -> None:
        self._known: dict[tuple, list[tuple[object, Callable]]] = {}

    def get(self, fn: Callable, graphdef, *static, **jit_kw) -> Callable:
        programs = self._known.setdefault((fn, *static), [])
        for known, program in programs:
            if known == graphdef:
                return program
        program = jax.jit(functools.partial(fn, graphdef, *static), **jit_kw)
        programs.append((graphdef, program))
        return program


class Scorer:
    """Scores models on fixed token windows ``int32[rows, seq]`` in fixed-size batches.

    Rows are padded to a multiple of ``batch_size`` (padding rows are dropped from the result, so
    no batch ever has another shape) and sharded over the mesh's "data" axis. In ``layer`` mode
    up to ``candidates`` (the mesh's "candidate" axis) masked models are scored side by side in
    one *wave*: each candidate group of devices runs one of them (``wave``).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        ignore_id: int | None,
        batch_size: int = 1,
        mesh: Mesh | None = None,
        token_chunk: int = 512,
        mode: str = "layer",
    ):
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be int32[rows>0, seq>1], got shape {tokens.shape}")
        if mode not in MODES:
            raise ValueError(f"scoring mode {mode!r}: expected one of {MODES}")
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh((1, 1))
        mesh_lib.check_batch_size("batch size", batch_size, self.mesh.shape["data"])
        self.candidates = self.mesh.shape["candidate"]
        if mode == "model" and self.candidates > 1:
            raise ValueError("a candidate mesh axis needs scoring mode 'layer'")
        self.rows = tokens.shape[0]
        self.seq_len = tokens.shape[1]
        self.batch_size = batch_size
        self.mode = mode
        self.ignore_id = -1 if ignore_id is None else int(ignore_id)
        self.token_chunk = token_chunk
        self.counts = (tokens[:, 1:] != self.ignore_id).sum(axis=1).astype(np.float64)
        padded = math.ceil(self.rows / batch_size) * batch_size
        rows = np.zeros((padded, self.seq_len), np.int32)
        rows[: self.rows] = tokens
        self._padded_rows = rows
        sharding = mesh_lib.rows_sharding(self.mesh, 2)
        self.batches = [
            mesh_lib.global_array(rows[i : i + batch_size], sharding)
            for i in range(0, padded, batch_size)
        ]
        # The real (not padding) rows of each batch.
        self.batch_rows = [
            range(i, min(i + batch_size, self.rows)) for i in range(0, padded, batch_size)
        ]
        self.compiles = CompileCounter()
        self._programs = _Programs()
        self._parts: _Parts | None = None
        self._whole = jax.jit(self._whole_fn, static_argnums=0)
        self._whole_split: tuple | None = None  # (model, graphdef, state) of the last model
        self._slots = NamedSharding(self.mesh, P("candidate"))
        self._waves = NamedSharding(self.mesh, P("candidate", "data"))
        # Slot ``k`` of a wave's activations ``[B, T, D]``, on every candidate group.
        self._pick = jax.jit(lambda h, k: h[k], out_shardings=mesh_lib.rows_sharding(self.mesh, 3))
        self._layer_index: dict[int, jax.Array] = {}
        self._zeros: dict[tuple, jax.Array] = {}
        # A group skips work with ``lax.cond``, unless groups may disagree on a branch that
        # holds a collective (several groups and a "model" axis): XLA:CPU then deadlocks (its
        # collective permutes wait for every device of the program), so such meshes compute
        # what a group would skip and discard it. Groups run in lock step, so on accelerators
        # that costs no time; on CPU, where fake devices share the cores, skipping saves time.
        self._skip = self.candidates == 1 or self.mesh.shape["model"] == 1

    # -- the pure pieces, traced once per program (each trace is counted) ----------------------

    def _whole_fn(self, graphdef, state, masks, tokens):
        self.compiles.hit()
        model = nnx.merge(graphdef, state)
        h = model.hidden_states(tokens, masks)
        return head_nll(h, *output_weight(model), tokens, self.ignore_id, self.token_chunk)[0]

    def _embed_fn(self, graphdef, state, tokens):
        """Every slot's embedded tokens: ``int32[C, B, T] -> [C, B, T, D]``."""
        self.compiles.hit()

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
        self.compiles.hit()

        def slot(state, h, entry, cos, sin, masks, start, index):
            layer = nnx.merge(graphdef, state)
            own = LayerMasks(*(m[0, index] for m in masks))
            h = jnp.where(index == start[0], entry, h[0])
            with contextlib.nullcontext() if self._skip else computing_off_blocks():
                h = self._unless(index >= start[0], lambda h: layer(h, cos, sin, own), h)
            return h[None]

        specs = (P(), P("candidate"), P(), P(), P(), P("candidate"), P("candidate"), P())
        return self._per_slot(slot, specs)(state, h, entry, cos, sin, masks, starts, index)

    def _head_fn(self, graphdef, tied, state, w_out, h, tokens, starts):
        """Per-row NLL sums of every occupied slot (zeros for empty ones)."""
        self.compiles.hit()

        def slot(state, w_out, h, tokens, start):
            norm = nnx.merge(graphdef, state)

            def nll(h):
                return head_nll(norm(h), w_out, tied, tokens, self.ignore_id, self.token_chunk)[0]

            def empty(h):
                return jnp.zeros(h.shape[:1], jnp.float32)

            if self._skip:
                return jax.lax.cond(start[0] < EMPTY, nll, empty, h[0])[None]
            return jnp.where(start[0] < EMPTY, nll(h[0]), 0.0)[None]

        specs = (P(), P(), P("candidate"), P(), P("candidate"))
        return self._per_slot(slot, specs)(state, w_out, h, tokens, starts)

    def _unless(self, run: jax.Array, fn: Callable, h: jax.Array) -> jax.Array:
        """``fn(h)`` when the scalar ``run`` holds, else ``h``: skipped, or computed and
        discarded when groups must not branch (see ``__init__``)."""
        if self._skip:
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
        model (layer mode only); the masks must leave every layer below it unchanged.
        """
        if masks is None:
            masks = masks_lib.ones(model.spec)
        slot = Slot(masks, start)
        sums = np.concatenate(
            [self.wave(model, [slot], b, cache)[0] for b in range(len(self.batches))]
        )
        return sums, self.counts.copy()

    def perplexity(
        self,
        model: CausalLM,
        masks: Masks | None = None,
        cache: PrefixCache | None = None,
        start: int = 0,
    ) -> float:
        """``exp(mean_rows(row_nll_sum / row_count))``; see the module docstring."""
        sums, counts = self.row_nll(model, masks, cache, start)
        if np.any(counts == 0):
            raise ValueError("a scoring row has no counted target token (all ignored)")
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
        occupied = [s for s in slots if s is not None]
        if any(s.start for s in occupied):
            if self.mode != "layer":
                raise ValueError("scoring from a cached layer needs scoring mode 'layer'")
            if cache is None:
                raise ValueError("a slot that starts after layer 0 needs the prefix cache")
        if self.mode == "model":
            if self._whole_split is None or self._whole_split[0] is not model:
                self._whole_split = (model, *nnx.split(model))
            graphdef, state = self._whole_split[1:]
            out = self._whole(graphdef, state, occupied[0].masks, self.batches[batch])[None]
        else:
            out = self._layer_wave(model, list(slots), batch, cache)
        real = self.batch_rows[batch]
        return np.asarray(out, np.float64)[: len(slots), : len(real)]

    # -- layer mode ---------------------------------------------------------------------------

    def _split(self, model: CausalLM) -> _Parts:
        """``model`` as bound layer-mode programs, kept for the last model (the search scores one
        model many times)."""
        if self._parts is not None and self._parts.model is model:
            return self._parts
        graphdef, state = nnx.split(model.model.embed_tokens)
        program = self._programs.get(self._embed_fn, graphdef, out_shardings=self._waves)
        embed = _Bound(program, (state,))
        layers = []
        for layer in model.model.layers:
            graphdef, state = nnx.split(layer)
            program = self._programs.get(self._layer_fn, graphdef, out_shardings=self._waves)
            layers.append(_Bound(program, (state,)))
        w_out, tied = output_weight(model)
        graphdef, state = nnx.split(model.model.norm)
        rep = mesh_lib.replicated(self.mesh)
        program = self._programs.get(self._head_fn, graphdef, tied, out_shardings=rep)
        head = _Bound(program, (state, w_out))
        cos, sin = (
            mesh_lib.global_array(np.asarray(t), rep) for t in model.rope_tables(self.seq_len)
        )
        self._parts = _Parts(model, embed, layers, head, cos, sin)
        return self._parts

    def _index(self, i: int) -> jax.Array:
        if i not in self._layer_index:
            value = np.asarray(i, np.int32)
            self._layer_index[i] = mesh_lib.global_array(value, mesh_lib.replicated(self.mesh))
        return self._layer_index[i]

    def _zeros_like(self, shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.Array:
        """An all-zero array, made once per shape (inputs that no slot reads)."""
        key = (shape, jnp.dtype(dtype), sharding.spec)
        if key not in self._zeros:
            zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
            self._zeros[key] = zeros()
        return self._zeros[key]

    def _slot_tokens(self, batches: list[int]) -> jax.Array:
        """``int32[C, B, T]``: batch ``batches[k]`` for slot ``k`` (the last one repeated)."""
        batches = batches + batches[-1:] * (self.candidates - len(batches))
        b = self.batch_size
        stacked = np.stack([self._padded_rows[i * b : (i + 1) * b] for i in batches])
        return mesh_lib.global_array(stacked, self._waves)

    def _place_slots(self, spec: ModelSpec, slots: list[Slot | None]) -> tuple[Masks, jax.Array]:
        """Masks ``[candidates, ...]`` and first layers ``int32[candidates]`` of the slots, on
        the candidate axis (empty slots: all-on masks, first layer ``EMPTY``)."""
        slots = slots + [None] * (self.candidates - len(slots))
        ones = masks_lib.ones(spec)
        masks = [ones if s is None else s.masks for s in slots]
        stacked = Masks(*(np.stack([np.asarray(m[k]) for m in masks]) for k in range(4)))
        starts = np.asarray([EMPTY if s is None else s.start for s in slots], np.int32)
        place = functools.partial(mesh_lib.global_array, sharding=self._slots)
        return Masks(*(place(m) for m in stacked)), place(starts)

    def prefix_cache(self, model: CausalLM) -> PrefixCache:
        """Run ``model`` (unmasked) once and keep every layer's input, per batch.

        Each candidate group computes the inputs of its own batches (one batch per group and
        wave) with the very programs that score candidates, and every group receives a copy, so
        a candidate started from the cache computes exactly what it would from layer 0.
        """
        if self.mode != "layer":
            raise ValueError("prefix caching needs scoring mode 'layer'")
        parts = self._split(model)
        n_batches, c = len(self.batches), self.candidates
        inputs: list[list[jax.Array]] = [[] for _ in range(n_batches)]
        in_flight = InFlight()
        for first in range(0, n_batches, c):
            batches = list(range(first, min(first + c, n_batches)))
            slots = [Slot(masks_lib.ones(model.spec), FROM_INPUT)] * len(batches)
            masks, starts = self._place_slots(model.spec, slots)
            h = parts.embed(self._slot_tokens(batches))
            entry = self._zeros_like(h.shape[1:], h.dtype, mesh_lib.rows_sharding(self.mesh, 3))
            for i, layer in enumerate([None, *parts.layers[:-1]]):
                if layer is not None:
                    args = (parts.cos, parts.sin, masks, starts, self._index(i - 1))
                    h = in_flight.add(layer(h, entry, *args))
                for k, batch in enumerate(batches):
                    inputs[batch].append(in_flight.add(self._pick(h, self._index(k))))
        return PrefixCache(model, inputs)

    def _layer_wave(
        self, model: CausalLM, slots: list[Slot | None], batch: int, cache: PrefixCache | None
    ) -> jax.Array:
        parts = self._split(model)
        if cache is None:  # every slot embeds the batch itself and starts from it
            slots = [None if s is None else s._replace(start=FROM_INPUT) for s in slots]
            h = parts.embed(self._slot_tokens([batch]))
        masks, starts = self._place_slots(model.spec, slots)
        first = max(0, min(s.start for s in slots if s is not None))
        in_flight = InFlight()
        for i in range(first, len(parts.layers)):
            if cache is None:
                entry = self._zeros_like(h.shape[1:], h.dtype, mesh_lib.rows_sharding(self.mesh, 3))
            else:
                entry = cache.inputs[batch][i]
                if i == first:
                    h = self._zeros_like((self.candidates, *entry.shape), entry.dtype, self._waves)
            args = (parts.cos, parts.sin, masks, starts, self._index(i))
            h = in_flight.add(parts.layers[i](h, entry, *args))
        return parts.head(h, self.batches[batch], starts)
