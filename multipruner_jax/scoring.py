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
  that only changes layer ``i`` is scored from layer ``i`` onward.

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


@dataclass
class PrefixCache:
    """Every layer input of the current model: ``inputs[batch][layer]: [B, T, D]``."""

    inputs: list[list[jax.Array]]


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
        self._split = None
        self._build_jitted()

    def _build_jitted(self) -> None:
        counter, ignore_id, chunk = self.compiles, self.ignore_id, self.token_chunk

        def whole(graphdef, state, masks, tokens):
            counter.hit()
            model = nnx.merge(graphdef, state)
            return head_nll(
                model.hidden_states(tokens, masks), *_output_weight(model), tokens, ignore_id, chunk
            )

        def embed(graphdef, state, tokens):
            counter.hit()
            return nnx.merge(graphdef, state)(tokens)

        def layer(graphdef, state, h, cos, sin, masks):
            counter.hit()
            return nnx.merge(graphdef, state)(h, cos, sin, masks)

        def head(graphdef, tied, state, w_out, h, tokens):
            counter.hit()
            h = nnx.merge(graphdef, state)(h)
            return head_nll(h, w_out, tied, tokens, ignore_id, chunk)

        self._whole = jax.jit(whole, static_argnums=0)
        self._impl = {"embed": embed, "layer": layer, "head": head}
        self._programs: dict = {}

    def _program(self, kind: str, graphdef, *static) -> Callable:
        """The jitted ``kind`` function bound to its graph, one per distinct graph, so that
        per-call dispatch never hashes a graph (host work that rivals a small layer). Graphs are
        matched by equality: equal NNX graphs can hash differently (metadata order)."""
        programs = self._programs.setdefault((kind, *static), [])
        for known, program in programs:
            if known == graphdef:
                return program
        program = jax.jit(functools.partial(self._impl[kind], graphdef, *static))
        programs.append((graphdef, program))
        return program

    def _rope_tables(self, model: CausalLM) -> tuple[jax.Array, jax.Array]:
        cos, sin = model.rope_tables(self.seq_len)
        rep = mesh_lib.replicated(self.mesh)
        return jax.device_put(cos, rep), jax.device_put(sin, rep)

    # -- perplexity ---------------------------------------------------------------------------

    def row_nll(
        self, model: CausalLM, masks: Masks | None = None, start: int = 0, cache=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row NLL sums and counts ``(float64[rows], float64[rows])`` of ``model``."""
        if masks is None:
            masks = masks_lib.ones(model.spec)
        if self.mode == "model":
            graphdef, state = nnx.split(model)
            outs = [self._whole(graphdef, state, masks, tokens) for tokens in self.batches]
        else:
            outs = self._layerwise(model, masks, start, cache)
        sums = np.concatenate([np.asarray(s, np.float64) for s, _ in outs])[: self.rows]
        counts = np.concatenate([np.asarray(c, np.float64) for _, c in outs])[: self.rows]
        return sums, counts

    def perplexity(
        self, model: CausalLM, masks: Masks | None = None, start: int = 0, cache=None
    ) -> float:
        """``exp(mean_rows(row_nll_sum / row_count))``; see the module docstring."""
        sums, counts = self.row_nll(model, masks, start, cache)
        if np.any(counts == 0):
            raise ValueError("a scoring row has no counted target token (all ignored)")
        return float(np.exp(np.mean(sums / counts)))

    # -- layer mode ---------------------------------------------------------------------------

    def _parts(self, model: CausalLM):
        """Jitted programs with their states for the embedding, each layer and the head, kept
        for the last model (the search scores one model many times)."""
        if self._split is not None and self._split[0] is model:
            return self._split[1]
        graphdef, state = nnx.split(model.model.embed_tokens)
        embed = (self._program("embed", graphdef), state)
        layers = []
        for layer in model.model.layers:
            graphdef, state = nnx.split(layer)
            layers.append((self._program("layer", graphdef), state))
        w_out, tied = _output_weight(model)
        graphdef, state = nnx.split(model.model.norm)
        head = (self._program("head", graphdef, tied), state, w_out)
        self._split = (model, (embed, layers, head), self._rope_tables(model))
        return self._split[1]

    def prefix_cache(self, model: CausalLM) -> PrefixCache:
        """Run the current (unmasked) model once and keep every layer's input, per batch."""
        if self.mode != "layer":
            raise ValueError("prefix caching needs scoring mode 'layer'")
        embed, layers, _ = self._parts(model)
        cos, sin = self._split[2]
        ones = masks_lib.ones(model.spec)
        inputs = []
        for tokens in self.batches:
            h = embed[0](embed[1], tokens)
            per_layer = []
            for i, (program, state) in enumerate(layers):
                per_layer.append(h)
                h = program(state, h, cos, sin, ones.layer(i))
            inputs.append(per_layer)
        return PrefixCache(inputs)

    def _layerwise(self, model: CausalLM, masks: Masks, start: int, cache: PrefixCache | None):
        if start and cache is None:
            raise ValueError("scoring from a layer > 0 needs a prefix cache")
        embed, layers, head = self._parts(model)
        cos, sin = self._split[2]
        layer_masks = [LayerMasks(*row) for row in zip(*masks, strict=True)]
        outs = []
        for b, tokens in enumerate(self.batches):
            h = cache.inputs[b][start] if start else embed[0](embed[1], tokens)
            for i in range(start, len(layers)):
                program, state = layers[i]
                h = program(state, h, cos, sin, layer_masks[i])
            program, state, w_out = head
            outs.append(program(state, w_out, h, tokens))
        return outs
