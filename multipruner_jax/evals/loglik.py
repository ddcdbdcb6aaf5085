"""Log-likelihoods of token continuations, batched by length buckets, jitted and sharded.

A request is an input ``tokens: int[T]`` whose last ``C`` positions predict the continuation
``targets: int[C]`` (``C <= T``; the logits at position ``T - C + j`` predict ``targets[j]``, as
in lm-eval's causal models). For each request the engine returns the sum of the continuation's
log-probabilities and whether every continuation token is the argmax of its logits.

Requests are sorted by (input bucket, continuation bucket, length), cut into batches of a fixed
number of rows (the last one padded with empty rows) and right-padded to the batch's buckets:
lengths round up to the ladder 8, 16, ..., 64, 80, 96, 112, 128, 160, ... (``bucket``), so an
evaluation compiles a few shapes per octave of request length, not one per request, and pads
at most 25 %. Right padding is exact for a causal model: padded positions come after every
scored one.

The forward is the per-layer engine (``engine``, as in scoring: one program per distinct layer
graph), so a pruned model with a few layer shapes compiles a few programs per bucket. The head
gathers the hidden states of the continuation positions only and computes their logits in fp32,
``token_chunk`` positions at a time against the stored head weight
(``cross_entropy.chunked_nll``), so neither ``[batch, seq, vocab]`` logits nor more than
``token_chunk x vocab`` of them ever exist. Rows are sharded over the mesh's "data" axis.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from models.decoder import CausalLM
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.runtime.cross_entropy import chunked_nll
from multipruner_jax.runtime.engine import Engine, PartFns
from multipruner_jax.runtime.inflight import InFlight

GRANULE = 8

# progress(done_requests, total_requests, seconds_since_start)
Progress = Callable[[int, int, float], None]


def bucket(n: int, granule: int = GRANULE) -> int:
    """``n`` rounded up to a multiple of a quarter of the power of two below it (at least
    ``granule``): 8, 16, ..., 64, 80, 96, 112, 128, 160, ...; at most 25 % padding, and four
    sizes per octave above ``4 * granule``."""
    if n <= granule:
        return granule
    step = max(granule, 1 << ((n - 1).bit_length() - 3))
    return -(-n // step) * step


class ContinuationScorer:
    """Scores ``(tokens, targets)`` requests with ``model`` in batches of ``batch_size`` rows.

    ``compiles`` counts traces of the jitted programs (each trace is followed by one compilation)
    and ``shapes`` the ``(input, continuation)`` bucket pairs run so far.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        mesh: Mesh | None = None,
        batch_size: int = 32,
        token_chunk: int = 512,
        progress: Progress | None = None,
    ):
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh((1, 1))
        mesh_lib.check_batch_size("batch size", batch_size, self.mesh.shape["data"])
        if token_chunk <= 0:
            raise ValueError(f"token chunk {token_chunk}: expected a positive count")
        self.model = model
        self.batch_size = batch_size
        self.token_chunk = token_chunk
        self.progress = progress
        self.shapes: set[tuple[int, int]] = set()
        head = functools.partial(_head, token_chunk=token_chunk)
        self._engine = Engine(PartFns(_embed, _layer, head), self.mesh)

    @property
    def compiles(self) -> int:
        """Traces of the jitted programs so far."""
        return self._engine.compiles.count

    # -- public -------------------------------------------------------------------------------

    def score(
        self, tokens: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per request: ``(float64[N] log-probability sums, bool[N] all-greedy)``."""
        if len(tokens) != len(targets):
            raise ValueError(f"{len(tokens)} inputs but {len(targets)} continuations")
        for i, (inp, cont) in enumerate(zip(tokens, targets, strict=True)):
            if not 0 < len(cont) <= len(inp):
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens for an input of "
                    f"{len(inp)}; expected 1 <= continuation <= input"
                )
        n = len(tokens)
        logprob = np.zeros(n, np.float64)
        greedy = np.zeros(n, bool)
        start = time.monotonic()
        done = 0

        def collect(rows, outputs) -> None:
            nonlocal done
            logprob[rows] = np.asarray(outputs[0], np.float64)[: len(rows)]
            greedy[rows] = np.asarray(outputs[1])[: len(rows)]
            done += len(rows)
            if self.progress is not None:
                self.progress(done, n, time.monotonic() - start)

        # Read a batch's results back only after the next one is dispatched, so that the host
        # prepares batch i + 1 while the devices compute batch i.
        pending = None
        for rows, t_size, c_size in self._batches(tokens, targets):
            outputs = self._dispatch(tokens, targets, rows, t_size, c_size)
            if pending is not None:
                collect(*pending)
            pending = (rows, outputs)
        if pending is not None:
            collect(*pending)
        return logprob, greedy

    # -- batching -----------------------------------------------------------------------------

    def _batches(self, tokens, targets):
        """``(request indices, input bucket, continuation bucket)`` per batch, longest first."""

        def key(i: int):
            t, c = len(tokens[i]), len(targets[i])
            return (-bucket(t), -bucket(c), -t, -c, i)

        order = sorted(range(len(tokens)), key=key)
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            t_size = max(bucket(len(tokens[i])) for i in rows)
            c_size = min(t_size, max(bucket(len(targets[i])) for i in rows))
            yield rows, t_size, c_size

    def _dispatch(self, tokens, targets, rows, t_size: int, c_size: int):
        """Start one batch on the devices; returns its ``(float32[B], bool[B])`` outputs."""
        b = self.batch_size
        inputs = np.zeros((b, t_size), np.int32)
        positions = np.zeros((b, c_size), np.int32)
        conts = np.zeros((b, c_size), np.int32)
        valid = np.zeros((b, c_size), bool)
        for r, i in enumerate(rows):
            t, c = len(tokens[i]), len(targets[i])
            inputs[r, :t] = tokens[i]
            positions[r, :c] = np.arange(t - c, t)
            conts[r, :c] = targets[i]
            valid[r, :c] = True
        self.shapes.add((t_size, c_size))
        put = functools.partial(jax.device_put, device=mesh_lib.rows_sharding(self.mesh, 2))
        inputs, positions, conts, valid = (put(x) for x in (inputs, positions, conts, valid))
        parts = self._engine.parts(self.model)
        cos, sin = parts.rope(t_size)
        in_flight = InFlight()  # a deep queue of programs deadlocks XLA:CPU (see inflight.py)
        h = in_flight.add(parts.embed(inputs))
        for layer in parts.layers:
            h = in_flight.add(layer(h, cos, sin))
        return parts.head(h, positions, conts, valid)


def _embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _layer(graphdef, state, h, cos, sin):
    return nnx.merge(graphdef, state)(h, cos, sin)


def _head(
    graphdef,
    tied: bool,
    state,
    w_out: jax.Array,
    h: jax.Array,
    positions: jax.Array,
    targets: jax.Array,
    valid: jax.Array,
    *,
    token_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Continuation log-probability sums and all-greedy flags: ``(float32[B], bool[B])``.

    ``h: [B, T, D]`` last-layer hidden states (normed here); ``w_out``: the embedding ``[V, D]``
    when ``tied``, else the head kernel ``[D, V]``; ``positions, targets: int32[B, C]`` and
    ``valid: bool[B, C]`` name the scored positions, their target tokens and which are real.
    """
    b, c = positions.shape
    picked = jnp.take_along_axis(h, positions[:, :, None], axis=1)  # [B, C, D]
    picked = nnx.merge(graphdef, state)(picked)
    nll, hit = chunked_nll(
        picked.reshape(b * c, -1), targets.reshape(-1), w_out, tied, token_chunk, greedy=True
    )
    logp, hit = -nll.reshape(b, c), hit.reshape(b, c)
    return jnp.where(valid, logp, 0.0).sum(axis=1), jnp.all(hit | ~valid, axis=1)
