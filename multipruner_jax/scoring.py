"""Perplexity scoring: jitted masked forward + chunked fp32 cross-entropy over fixed token windows.

Protocol (the reference's ``evaluate_ppl``): logits at positions ``0..T-2`` predict tokens
``1..T-1``; tokens equal to ``ignore_id`` are not counted; each row's mean NLL is taken over its
counted targets; perplexity is ``exp`` of the mean of the row means.

Two execution modes share the same pure pieces (embed, decoder layer, head NLL):

* ``"model"``: one ``jax.jit`` of the whole ``(params, masks, tokens) -> (nll_sums, counts)``;
  it compiles once per set of parameter shapes.
* ``"layer"``: a host loop over per-layer jitted calls, compiled once per distinct layer shape, so
  a rebuilt model after a removal only compiles the layers whose shape is new. It also allows
  prefix caching: ``PrefixCache`` keeps each layer's input for the current model, and a candidate
  that only changes layer ``i`` is scored from layer ``i`` onward (``cache.start_at(i)``).

Masks are always traced inputs, so all candidates of a search step reuse the compiled programs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models import masks as masks_lib
from models.decoder import CausalLM
from models.masks import LayerMasks, Masks
from models.spec import ModelSpec
from multipruner_jax import mesh as mesh_lib

MODES = ("layer", "model")


class CompileCounter:
    """Counts traces of the scoring functions (each trace is followed by one compilation)."""

    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1


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
    targets = tokens[:, 1:].reshape(-1)
    n = b * (t - 1)
    token_chunk = min(token_chunk, n)
    chunks = math.ceil(n / token_chunk)
    pad = chunks * token_chunk - n
    hs = jnp.pad(h[:, :-1].reshape(n, d), ((0, pad), (0, 0))).reshape(chunks, token_chunk, d)
    ts = jnp.pad(targets, (0, pad)).reshape(chunks, token_chunk)
    contract = 1 if tied else 0

    def body(_, chunk):
        h_c, t_c = chunk
        logits = jax.lax.dot_general(
            h_c, w_out, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
        return None, lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]

    _, nll = jax.lax.scan(body, None, (hs, ts))
    nll = nll.reshape(-1)[:n].reshape(b, t - 1)
    counted = (tokens[:, 1:] != ignore_id).astype(jnp.float32)
    return (nll * counted).sum(axis=1), counted.sum(axis=1)


def _output_weight(model: CausalLM) -> tuple[jax.Array, bool]:
    """The LM head weight as stored (embedding ``[V, D]`` if tied, else ``[D, V]``), and tied."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...], True
    return model.lm_head.kernel[...], False


def prefix_cache_bytes(spec: ModelSpec, rows: int, seq_len: int, dtype: jnp.dtype) -> int:
    """Bytes a ``PrefixCache`` holds: every layer's input for every row."""
    return rows * seq_len * spec.hidden_size * spec.num_layers * jnp.dtype(dtype).itemsize


@dataclass(frozen=True)
class CachedStart:
    """Where a masked forward starts: layer ``layer``, from the cached inputs of that layer."""

    cache: PrefixCache
    layer: int


@dataclass(frozen=True)
class PrefixCache:
    """Every layer input of one model: ``inputs[batch][layer]: [B, T, D]``."""

    model: CausalLM
    inputs: list[list[jax.Array]]

    def start_at(self, layer: int) -> CachedStart:
        return CachedStart(self, layer)


@dataclass(frozen=True)
class _Bound:
    """A jitted program with its leading arguments (parameter state, ...) already given."""

    program: Callable
    args: tuple

    def __call__(self, *args):
        return self.program(*self.args, *args)


@dataclass(frozen=True)
class _Parts:
    """One model as layer-mode programs: ``embed(tokens) -> h``,
    ``layers[i](h, cos, sin, layer_masks) -> h``, ``head(h, tokens) -> (nll_sums, counts)``."""

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

    def get(self, fn: Callable, graphdef, *static) -> Callable:
        programs = self._known.setdefault((fn, *static), [])
        for known, program in programs:
            if known == graphdef:
                return program
        program = jax.jit(functools.partial(fn, graphdef, *static))
        programs.append((graphdef, program))
        return program


class Scorer:
    """Scores models on fixed token windows ``int32[rows, seq]`` in fixed-size batches.

    Rows are padded to a multiple of ``batch_size`` (padding rows are dropped from the result, so
    no batch ever has another shape). Rows are sharded over the mesh's "data" axis.
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
        data = self.mesh.shape["data"]
        if batch_size % data:
            raise ValueError(f"batch size {batch_size} is not a multiple of the data axis {data}")
        self.rows = tokens.shape[0]
        self.seq_len = tokens.shape[1]
        self.batch_size = batch_size
        self.mode = mode
        self.ignore_id = -1 if ignore_id is None else int(ignore_id)
        self.token_chunk = token_chunk
        padded = math.ceil(self.rows / batch_size) * batch_size
        rows = np.zeros((padded, self.seq_len), np.int32)
        rows[: self.rows] = tokens
        sharding = mesh_lib.rows_sharding(self.mesh, 2)
        self.batches = [
            jax.device_put(rows[i : i + batch_size], sharding) for i in range(0, padded, batch_size)
        ]
        self.compiles = CompileCounter()
        self._programs = _Programs()
        self._parts: _Parts | None = None
        self._whole = jax.jit(self._whole_fn, static_argnums=0)

    # -- the pure pieces, traced once per program (each trace is counted) ----------------------

    def _whole_fn(self, graphdef, state, masks, tokens):
        self.compiles.hit()
        model = nnx.merge(graphdef, state)
        h = model.hidden_states(tokens, masks)
        return head_nll(h, *_output_weight(model), tokens, self.ignore_id, self.token_chunk)

    def _embed_fn(self, graphdef, state, tokens):
        self.compiles.hit()
        return nnx.merge(graphdef, state)(tokens)

    def _layer_fn(self, graphdef, state, h, cos, sin, masks):
        self.compiles.hit()
        return nnx.merge(graphdef, state)(h, cos, sin, masks)

    def _head_fn(self, graphdef, tied, state, w_out, h, tokens):
        self.compiles.hit()
        h = nnx.merge(graphdef, state)(h)
        return head_nll(h, w_out, tied, tokens, self.ignore_id, self.token_chunk)

    # -- perplexity ---------------------------------------------------------------------------

    def row_nll(
        self, model: CausalLM, masks: Masks | None = None, start: CachedStart | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row NLL sums and counts ``(float64[rows], float64[rows])`` of ``model``.

        ``start``: begin at a cached layer input of this same model (layer mode only); the masks
        must leave every layer below it unchanged.
        """
        if masks is None:
            masks = masks_lib.ones(model.spec)
        if self.mode == "model":
            if start is not None:
                raise ValueError("scoring from a cached layer needs scoring mode 'layer'")
            graphdef, state = nnx.split(model)
            outs = [self._whole(graphdef, state, masks, tokens) for tokens in self.batches]
        else:
            outs = self._layerwise(model, masks, start)
        sums = np.concatenate([np.asarray(s, np.float64) for s, _ in outs])[: self.rows]
        counts = np.concatenate([np.asarray(c, np.float64) for _, c in outs])[: self.rows]
        return sums, counts

    def perplexity(
        self, model: CausalLM, masks: Masks | None = None, start: CachedStart | None = None
    ) -> float:
        """``exp(mean_rows(row_nll_sum / row_count))``; see the module docstring."""
        sums, counts = self.row_nll(model, masks, start)
        if np.any(counts == 0):
            raise ValueError("a scoring row has no counted target token (all ignored)")
        return float(np.exp(np.mean(sums / counts)))

    # -- layer mode ---------------------------------------------------------------------------

    def _split(self, model: CausalLM) -> _Parts:
        """``model`` as bound layer-mode programs, kept for the last model (the search scores one
        model many times)."""
        if self._parts is not None and self._parts.model is model:
            return self._parts
        graphdef, state = nnx.split(model.model.embed_tokens)
        embed = _Bound(self._programs.get(self._embed_fn, graphdef), (state,))
        layers = []
        for layer in model.model.layers:
            graphdef, state = nnx.split(layer)
            layers.append(_Bound(self._programs.get(self._layer_fn, graphdef), (state,)))
        w_out, tied = _output_weight(model)
        graphdef, state = nnx.split(model.model.norm)
        head = _Bound(self._programs.get(self._head_fn, graphdef, tied), (state, w_out))
        cos, sin = model.rope_tables(self.seq_len)
        rep = mesh_lib.replicated(self.mesh)
        cos, sin = jax.device_put(cos, rep), jax.device_put(sin, rep)
        self._parts = _Parts(model, embed, layers, head, cos, sin)
        return self._parts

    def prefix_cache(self, model: CausalLM) -> PrefixCache:
        """Run ``model`` (unmasked) once and keep every layer's input, per batch."""
        if self.mode != "layer":
            raise ValueError("prefix caching needs scoring mode 'layer'")
        parts = self._split(model)
        ones = masks_lib.ones(model.spec)
        inputs = []
        for tokens in self.batches:
            h = parts.embed(tokens)
            per_layer = []
            for i, layer in enumerate(parts.layers):
                per_layer.append(h)
                h = layer(h, parts.cos, parts.sin, ones.layer(i))
            inputs.append(per_layer)
        return PrefixCache(model, inputs)

    def _layerwise(self, model: CausalLM, masks: Masks, start: CachedStart | None):
        if start is not None and start.cache.model is not model:
            raise ValueError("the prefix cache belongs to another model")
        parts = self._split(model)
        first = 0 if start is None else start.layer
        layer_masks = [LayerMasks(*row) for row in zip(*masks, strict=True)]
        outs = []
        for b, tokens in enumerate(self.batches):
            h = parts.embed(tokens) if start is None else start.cache.inputs[b][first]
            for i in range(first, len(parts.layers)):
                h = parts.layers[i](h, parts.cos, parts.sin, layer_masks[i])
            outs.append(parts.head(h, tokens))
        return outs
