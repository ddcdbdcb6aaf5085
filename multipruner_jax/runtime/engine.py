"""The per-layer engine: a model run as jitted programs, one per part (the embedding, each decoder
layer, the head), compiled once per distinct NNX graph and counted.

A forward is a host loop ``embed -> layers[0] -> ... -> layers[L-1] -> head``. The caller brings
what each part computes (``PartFns``): scoring runs a *wave* of masked candidates side by side,
log-likelihoods run plain layers and gather continuation positions; the engine does the rest.
It splits each part of a model into its NNX graph and state, finds the part's program for that
graph (or jits a new one), and binds the program to the state (``Bound``). A model rebuilt after a
removal therefore compiles only the parts whose graph is new, and bound programs never hash a
graph per call (host work that rivals a small layer). Graphs are matched by equality: equal NNX
graphs can hash differently (metadata order).

``CompileCounter`` counts traces (each is followed by one compilation): the tests bound compiles
by the number of layer shapes with it, and the search logs it per step. LoRA's whole-model
training steps count their compiles with it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding

from models.decoder import CausalLM
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.runtime.cross_entropy import output_weight


class CompileCounter:
    """Counts traces of the functions it jits (each trace is followed by one compilation)."""

    def __init__(self) -> None:
        self.count = 0

    def jit(self, fn: Callable, **jit_kw) -> Callable:
        """``jax.jit(fn, **jit_kw)``, counting each trace."""

        def traced(*args):
            self.count += 1
            return fn(*args)

        return jax.jit(traced, **jit_kw)


@dataclass(frozen=True)
class Bound:
    """A jitted program with its leading arguments (parameter state, ...) already given."""

    program: Callable
    args: tuple

    def __call__(self, *args):
        return self.program(*self.args, *args)


@dataclass(frozen=True)
class PartFns:
    """What each part of a model computes, and where its output lives (``None``: the
    compiler's choice).

    ``embed(graphdef, state, *args)`` runs ``model.model.embed_tokens``; ``layer(graphdef,
    state, *args)`` one decoder layer; ``head(graphdef, tied, state, w_out, *args)`` the final
    norm (``graphdef, state``) and the LM head weight ``w_out`` (see
    ``cross_entropy.output_weight``). ``*args`` are what the caller passes to the bound programs.
    """

    embed: Callable
    layer: Callable
    head: Callable
    embed_out: Sharding | None = None
    layer_out: Sharding | None = None
    head_out: Sharding | None = None


@dataclass(frozen=True)
class Parts:
    """One model as bound programs: ``embed(*args)``, ``layers[i](*args)``, ``head(*args)``."""

    model: CausalLM
    embed: Bound
    layers: list[Bound]
    head: Bound
    mesh: Mesh
    _rope: dict[int, tuple[jax.Array, jax.Array]] = field(default_factory=dict)

    def rope(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
        """The model's rotary tables for ``seq_len`` positions, replicated on the mesh (made once
        per length)."""
        if seq_len not in self._rope:
            rep = mesh_lib.replicated(self.mesh)
            tables = self.model.rope_tables(seq_len)
            self._rope[seq_len] = tuple(mesh_lib.global_array(np.asarray(t), rep) for t in tables)
        return self._rope[seq_len]


class Engine:
    """The per-layer programs of ``fns`` on ``mesh``; ``compiles`` counts their traces."""

    def __init__(self, fns: PartFns, mesh: Mesh):
        self.fns = fns
        self.mesh = mesh
        self.compiles = CompileCounter()
        self._known: dict[tuple, list[tuple[object, Callable]]] = {}
        self._last: Parts | None = None

    def parts(self, model: CausalLM) -> Parts:
        """``model`` as bound programs, kept for the last model (the search and an evaluation
        run one model many times)."""
        if self._last is not None and self._last.model is model:
            return self._last
        fns = self.fns
        graphdef, state = nnx.split(model.model.embed_tokens)
        embed = Bound(self._program(fns.embed, graphdef, out=fns.embed_out), (state,))
        layers = []
        for layer in model.model.layers:
            graphdef, state = nnx.split(layer)
            layers.append(Bound(self._program(fns.layer, graphdef, out=fns.layer_out), (state,)))
        w_out, tied = output_weight(model)
        graphdef, state = nnx.split(model.model.norm)
        head = Bound(self._program(fns.head, graphdef, tied, out=fns.head_out), (state, w_out))
        self._last = Parts(model, embed, layers, head, self.mesh)
        return self._last

    def _program(self, fn: Callable, graphdef, *static, out: Sharding | None) -> Callable:
        """``fn`` bound to ``graphdef`` and ``static`` and jitted: one per distinct graph."""
        programs = self._known.setdefault((fn, *static), [])
        for known, program in programs:
            if known == graphdef:
                return program

        def part(*args):
            return fn(graphdef, *static, *args)

        program = self.compiles.jit(part, **({} if out is None else {"out_shardings": out}))
        programs.append((graphdef, program))
        return program
