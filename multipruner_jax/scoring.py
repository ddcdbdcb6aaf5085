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

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models import masks as masks_lib
from models.decoder import CausalLM
from models.masks import LayerMasks, Masks
from multipruner_jax import mesh as mesh_lib

MODES = ("layer", "model")


class CompileCounter:
    """Counts traces of the scoring functions (each trace is followed by one compilation)."""

    def __init__(self) -> None:
        self.count = 0

    def hit(self) -> None:
        self.count += 1


def head_nll(
    h: jax.Array, w_out: jax.Array, tokens: jax.Array, ignore_id: int, vocab_chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Per-row NLL sums and target counts without materialising full logits.

    ``h: [B, T, D]`` final-normed hidden states; ``w_out: [D, V]``; ``tokens: int32[B, T]``;
    ``ignore_id < 0`` counts every target. Returns ``(float32[B], float32[B])``.
    """
    h = h[:, :-1]
    targets = tokens[:, 1:]
    d, v = w_out.shape
    n_chunks = math.ceil(v / vocab_chunk)
    w = jnp.pad(w_out, ((0, 0), (0, n_chunks * vocab_chunk - v)))
    w = w.reshape(d, n_chunks, vocab_chunk).transpose(1, 0, 2)
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * vocab_chunk
    b, t = targets.shape

    def body(carry, chunk):
        run_max, run_sum, target_logit = carry
        w_c, offset = chunk
        logits = jnp.einsum("btd,dv->btv", h, w_c, preferred_element_type=jnp.float32)
        cols = offset + jnp.arange(vocab_chunk, dtype=jnp.int32)
        logits = jnp.where(cols < v, logits, -jnp.inf)
        new_max = jnp.maximum(run_max, logits.max(axis=-1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(
            axis=-1
        )
        hit = targets[..., None] == cols
        target_logit = target_logit + jnp.where(hit, logits, 0.0).sum(axis=-1)
        return (new_max, run_sum, target_logit), None

    init = (
        jnp.full((b, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, t), jnp.float32),
        jnp.zeros((b, t), jnp.float32),
    )
    (run_max, run_sum, target_logit), _ = jax.lax.scan(body, init, (w, offsets))
    nll = run_max + jnp.log(run_sum) - target_logit
    counted = (targets != ignore_id).astype(jnp.float32)
    return (nll * counted).sum(axis=1), counted.sum(axis=1)


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
        vocab_chunk: int = 8192,
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
        self.vocab_chunk = vocab_chunk
        padded = math.ceil(self.rows / batch_size) * batch_size
        rows = np.zeros((padded, self.seq_len), np.int32)
        rows[: self.rows] = tokens
        sharding = mesh_lib.rows_sharding(self.mesh, 2)
        self.batches = [
            jax.device_put(rows[i : i + batch_size], sharding) for i in range(0, padded, batch_size)
        ]
        self.compiles = CompileCounter()
        self._rope: tuple[jax.Array, jax.Array] | None = None
        self._build_jitted()

    def _build_jitted(self) -> None:
        counter, ignore_id, chunk = self.compiles, self.ignore_id, self.vocab_chunk

        def whole(graphdef, state, masks, tokens):
            counter.hit()
            model = nnx.merge(graphdef, state)
            h = model.hidden_states(tokens, masks)
            return head_nll(h, model.output_embedding(), tokens, ignore_id, chunk)

        def embed(graphdef, state, tokens):
            counter.hit()
            return nnx.merge(graphdef, state)(tokens)

        def layer(graphdef, state, h, cos, sin, masks):
            counter.hit()
            return nnx.merge(graphdef, state)(h, cos, sin, masks)

        def head(graphdef, state, tied, w_out, h, tokens):
            counter.hit()
            h = nnx.merge(graphdef, state)(h)
            return head_nll(h, w_out.T if tied else w_out, tokens, ignore_id, chunk)

        self._whole = jax.jit(whole, static_argnums=0)
        self._embed = jax.jit(embed, static_argnums=0)
        self._layer = jax.jit(layer, static_argnums=0)
        self._head = jax.jit(head, static_argnums=(0, 2))

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
        embed = nnx.split(model.model.embed_tokens)
        layers = [nnx.split(layer) for layer in model.model.layers]
        tied = model.lm_head is None
        w_out = model.model.embed_tokens.embedding if tied else model.lm_head.kernel
        head = (*nnx.split(model.model.norm), tied, w_out[...])
        return embed, layers, head

    def prefix_cache(self, model: CausalLM) -> PrefixCache:
        """Run the current (unmasked) model once and keep every layer's input, per batch."""
        if self.mode != "layer":
            raise ValueError("prefix caching needs scoring mode 'layer'")
        embed, layers, _ = self._parts(model)
        cos, sin = self._rope_tables(model)
        ones = masks_lib.ones(model.spec)
        inputs = []
        for tokens in self.batches:
            h = self._embed(*embed, tokens)
            per_layer = []
            for i, (graphdef, state) in enumerate(layers):
                per_layer.append(h)
                h = self._layer(graphdef, state, h, cos, sin, ones.layer(i))
            inputs.append(per_layer)
        return PrefixCache(inputs)

    def _layerwise(self, model: CausalLM, masks: Masks, start: int, cache: PrefixCache | None):
        if start and cache is None:
            raise ValueError("scoring from a layer > 0 needs a prefix cache")
        embed, layers, head = self._parts(model)
        cos, sin = self._rope_tables(model)
        layer_masks = [LayerMasks(*row) for row in zip(*masks, strict=True)]
        outs = []
        for b, tokens in enumerate(self.batches):
            h = cache.inputs[b][start] if start else self._embed(*embed, tokens)
            for i in range(start, len(layers)):
                h = self._layer(*layers[i], h, cos, sin, layer_masks[i])
            outs.append(self._head(*head, h, tokens))
        return outs
