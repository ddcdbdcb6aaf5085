"""Side by side on SmolLM2-135M: the reference's search loop in PyTorch, and ours plain, with the
prefix cache, with the branch and bound, and with a candidate axis of 8 fake CPU devices.

python bench/search.py [--seqlen=512] [--target_ratio=2] [--block_samples=24] [--width_samples=10]

The default workload is the paper's protocol shape at this model's scale: 24 block and 10 width
SOTU records, concatenated, give 7 block and 3 width rows of 512 tokens. ``--seqlen=256
--block_samples=4 --width_samples=2`` (2 block rows and 1 width row of 256 tokens) is the small
shape of the earlier tables, where the reference loop reaches only 38-40 % of the matmul peak, so
the speed-ups look larger there than at the users' shape.

Everything runs in this one process on the same reordered weights and the same calibration rows
(State of the Union text), and every variant must take the same decisions. The reference loop is
a transformers model scored the way the original MultiPruner scores: every candidate is a full
forward of the model with all removals so far plus the candidate applied as its patched
transformers applies them (a removed block and its norm are skipped, a width keeps a prefix
slice of the weights), perplexity as its ``evaluate_ppl`` (rows in batches of 2).

Reported per variant: wall time, the part spent tracing and compiling, executed matmul FLOPs
(counted from shapes by ``bench/cost.py``: ours computes masked widths at full width and
skips the blocks a mask switches off; the reference computes the sliced, smaller model), FLOP/s
against this machine's fp32 matmul peak (a 4096^3 jitted ``jnp.dot``, best of 5, measured here),
and the speed-up over the reference loop. Then the exact limit: the fewest FLOPs an exhaustive
exact search needs (one prefix pass per step, then every candidate from its own layer at its
pruned width) divided by the peak, and divided by the rate of the model's own matmul shapes
(also printed, with the rate of one plain dense forward). Finally the first block step with
removed blocks computed and discarded instead of skipped.

``XLA_FLAGS=--xla_force_host_platform_device_count=1 python bench/search.py --candidates=1``
runs everything on one CPU device (the 8 fake devices cost about a tenth of the speed here).
"""

from __future__ import annotations

import functools
import os

# torch's OpenMP threads spin while they wait; when other jobs share the cores that slows torch
# down up to tenfold (measured here), which would flatter us. Passive waiting costs nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import defaultdict  # noqa: E402

import cost  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from models.spec import ModelSpec, pruned_ratio  # noqa: E402
from multipruner_jax.base import mesh as mesh_lib  # noqa: E402
from multipruner_jax.exporting import export
from multipruner_jax.prune import search, surgery  # noqa: E402
from multipruner_jax.runtime.scoring import PrefixCache, Scorer  # noqa: E402
from multipruner_jax.storage import assets, data, hf_io

_SEQLEN = flags.DEFINE_integer("seqlen", 512, "Calibration row length.")
_TARGET = flags.DEFINE_float("target_ratio", 2.0, "Target ratio of the short search (percent).")
_BLOCK = flags.DEFINE_integer("block_samples", 24, "Block calibration records (24: 7 rows).")
_WIDTH = flags.DEFINE_integer("width_samples", 10, "Width calibration records (10: 3 rows).")
_CANDIDATES = flags.DEFINE_integer("candidates", 8, "Candidate groups of the last variant.")

SETTINGS = dict(distribution=(0.44, 0.52, 0.04), mlp_group=256, attn_group=192)
_COMPILE_EVENTS = ("backend_compile", "jaxpr_trace", "jaxpr_to_mlir")
_durations: dict[str, float] = defaultdict(float)


def _listen(event: str, duration: float, **_) -> None:
    if any(key in event for key in _COMPILE_EVENTS):
        _durations["compile"] += duration


class CountingScorer(Scorer):
    """A ``Scorer`` that adds up the matmul FLOPs its waves and prefix passes execute
    (``computed``: removed blocks are computed and discarded, not skipped)."""

    def __init__(self, *args, computed: bool = False, **kwargs):
        super().__init__(*args, skip_off_blocks=not computed, **kwargs)
        self.flops = 0.0

    def wave(self, model, slots, batch, cache: PrefixCache | None = None) -> np.ndarray:
        for slot in slots:
            if slot is not None:
                self.flops += cost.masked_flops(
                    model.spec,
                    slot.masks,
                    self.rows.batch_size,
                    self.rows.seq_len,
                    slot.start,
                    self.skip_off_blocks,
                )
        return super().wave(model, slots, batch, cache)

    def prefix_cache(self, model) -> PrefixCache:
        spec = model.spec
        b, t = self.rows.batch_size, self.rows.seq_len
        last = cost.layer_flops(spec, spec.layers[-1], b, t)
        per_batch = cost.forward_flops(spec, b, t, head=False) - last
        self.flops += per_batch * len(self.rows)
        return super().prefix_cache(model)


@dataclasses.dataclass
class Run:
    name: str
    decisions: list[tuple[str, str, int]]
    wall: float
    compile: float
    flops: float
    skipped: float = 0.0


def _ours(model, rows, ignore, name, shape, settings, computed: bool = False) -> Run:
    mesh = mesh_lib.make_mesh(shape)
    place = surgery.shrink(model, model.spec, functools.partial(mesh_lib.param_sharding, mesh))
    scorers = {
        k: CountingScorer(r, ignore_id=ignore, batch_size=shape[1], mesh=mesh, computed=computed)
        for k, r in rows.items()
    }
    _durations.clear()
    start = time.perf_counter()
    _, state = search.search(
        place,
        model.spec,
        scorers,
        settings,
        sharding_for=functools.partial(mesh_lib.param_sharding, mesh),
    )
    wall = time.perf_counter() - start
    cands = sum(s.candidates for s in state.steps)
    skipped = sum(s.rows_skipped * s.candidates for s in state.steps) / cands
    return Run(
        name,
        [(s.stage, s.kind, s.layer) for s in state.steps],
        wall,
        _durations["compile"],
        sum(s.flops for s in scorers.values()),
        skipped,
    )


class TorchReference:
    """The reference's greedy loop on a transformers Llama model (see the module docstring)."""

    def __init__(self, hf_model, dense: ModelSpec, settings: search.Settings, rows, ignore):
        self.model, self.dense, self.settings = hf_model, dense, settings
        self.rows, self.ignore = rows, ignore
        self.full = {}
        for layer in hf_model.model.layers:
            layer.forward = types.MethodType(_skipping_forward, layer)
            for proj in (*_attn_projs(layer), *_mlp_projs(layer)):
                self.full[proj] = proj.weight.detach()

    def _apply(self, spec: ModelSpec) -> None:
        """Every layer as ``spec`` has it: blocks on or off, weights sliced to the kept prefix."""
        hd, per_kv = spec.head_dim, spec.q_per_kv
        for layer, shape in zip(self.model.model.layers, spec.layers, strict=True):
            layer.has_attn, layer.has_mlp = shape.has_attn, shape.has_mlp
            q, kv, w = shape.kv_groups * per_kv * hd, shape.kv_groups * hd, shape.mlp_width
            attn, mlp = layer.self_attn, layer.mlp
            for proj, rows in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv)):
                proj.weight = torch.nn.Parameter(self.full[proj][:rows], requires_grad=False)
            attn.o_proj.weight = torch.nn.Parameter(self.full[attn.o_proj][:, :q], False)
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight = torch.nn.Parameter(self.full[proj][:w], requires_grad=False)
            mlp.down_proj.weight = torch.nn.Parameter(self.full[mlp.down_proj][:, :w], False)

    def ppl(self, spec: ModelSpec, rows: np.ndarray) -> float:
        """The reference's ``evaluate_ppl`` of the model pruned to ``spec``."""
        self._apply(spec)
        loss = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=self.ignore)
        means = []
        with torch.inference_mode():
            for i in range(0, len(rows), 2):
                ids = torch.from_numpy(rows[i : i + 2]).long()
                logits = self.model(ids).logits[:, :-1]
                targets = ids[:, 1:]
                nll = loss(logits.permute(0, 2, 1), targets).double()
                counted = targets != self.ignore
                means.append((nll * counted).sum(1) / counted.sum(1))
        return float(torch.exp(torch.cat(means).mean()))

    def search(self) -> Run:
        spec, decisions, flops, start = self.dense, [], 0.0, time.perf_counter()
        for stage, target in zip(search.STAGES, self.settings.stage_targets(), strict=True):
            rows = self.rows[search.scorer_for(stage)]
            while pruned_ratio(spec, self.dense) < target:
                best, best_ppl = None, float("inf")
                for cand in search.candidates(stage, spec, self.settings):
                    after = search.remove(spec, cand, self.settings)
                    ppl = self.ppl(after, rows)
                    flops += cost.forward_flops(after, rows.shape[0], rows.shape[1])
                    if ppl < best_ppl:
                        best, best_ppl = cand, ppl
                if best is None:
                    break
                spec = search.remove(spec, best, self.settings)
                decisions.append((stage, best.kind, best.layer))
        return Run("reference loop (torch)", decisions, time.perf_counter() - start, 0.0, flops)


def _attn_projs(layer):
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp_projs(layer):
    m = layer.mlp
    return m.gate_proj, m.up_proj, m.down_proj


def _skipping_forward(self, hidden_states, **kwargs):
    """A transformers decoder layer that skips a removed block, as the reference's patch does."""
    if self.has_attn:
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states + attended
    if self.has_mlp:
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
    return hidden_states


def minimum_flops(dense: ModelSpec, settings, decisions, rows: dict[str, np.ndarray]) -> float:
    """The fewest FLOPs of an exhaustive exact search with these decisions: per step one prefix
    pass (layers 0..L-2), then every candidate from its own layer at its pruned shapes."""
    spec, total = dense, 0.0
    for stage, kind, layer in decisions:
        r = rows[search.scorer_for(stage)]
        n, seq = r.shape
        last = cost.layer_flops(spec, spec.layers[-1], n, seq)
        total += cost.forward_flops(spec, n, seq, head=False) - last
        for cand in search.candidates(stage, spec, settings):
            after = search.remove(spec, cand, settings)
            total += cost.forward_flops(after, n, seq, first=cand.layer)
        spec = search.remove(spec, search.Candidate(stage, kind, layer), settings)
    return total


def matmul_peak(n: int = 4096) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` on one device (best of 5)."""
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def shape_peak(spec: ModelSpec, tokens: int) -> float:
    """FLOP/s of the dense model's own matmuls on ``tokens`` positions (one device, best of 5):
    one layer's q, k, v, o, gate, up and down projections and its attention scores and values,
    and the LM head, each jitted and timed alone, weighted by how often a forward runs them."""
    d, hd = spec.hidden_size, spec.head_dim
    heads, kv, inter = spec.num_attention_heads, spec.num_key_value_heads, spec.intermediate_size
    projections = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d)]
    projections += [(d, inter), (d, inter), (inter, d)]
    inputs = [jnp.ones((tokens, k), jnp.float32) for k, _ in projections]
    weights = [jnp.ones(shape, jnp.float32) for shape in projections]
    q = jnp.ones((heads, tokens, hd), jnp.float32)
    x, embedding = inputs[0], jnp.ones((spec.vocab_size, d), jnp.float32)

    def layer(inputs, weights, q):
        scores = jnp.einsum("htd,hsd->hts", q, q)
        return [a @ w for a, w in zip(inputs, weights, strict=True)], jnp.einsum(
            "hts,hsd->htd", scores, q
        )

    def head(x, embedding):
        return jnp.einsum("td,vd->tv", x, embedding)

    layer_flops = 2 * tokens * sum(a * b for a, b in projections) + 4 * heads * tokens**2 * hd
    head_flops = 2 * tokens * d * spec.vocab_size
    seconds = []
    for fn, args in ((jax.jit(layer), (inputs, weights, q)), (jax.jit(head), (x, embedding))):
        jax.block_until_ready(fn(*args))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    layers = spec.num_layers
    return (layers * layer_flops + head_flops) / (layers * seconds[0] + seconds[1])


def forward_rate(model, rows: np.ndarray) -> float:
    """Matmul FLOP/s of dense-model perplexity on ``rows`` with batch 1 (best of 5)."""
    scorer = Scorer(rows, ignore_id=None, batch_size=1, mesh=mesh_lib.make_mesh((1, 1, 1)))
    scorer.perplexity(model)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        scorer.perplexity(model)
        best = min(best, time.perf_counter() - start)
    return cost.forward_flops(model.spec, 1, rows.shape[1]) * rows.shape[0] / best


def _first_block_step(model, rows, ignore, computed: bool) -> Run:
    settings = search.Settings(target_ratio=0.01, **{**SETTINGS, "distribution": (1.0, 0.0, 0.0)})
    name = "first block step, removed blocks " + ("computed" if computed else "skipped")
    return _ours(model, rows, ignore, name, (1, 1, 1), settings, computed)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    jax.monitoring.register_event_duration_secs_listener(_listen)
    path = str(assets.smollm2_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    width, block = data.calibration_windows(
        str(assets.sotu_dir()),
        tokenizer,
        seqlen=_SEQLEN.value,
        num_width=_WIDTH.value,
        num_block=_BLOCK.value,
    )
    rows = {"block": block, "width": width}
    ignore = tokenizer.eos_token_id
    model = hf_io.load_model(path)
    surgery.reorder(model)
    with tempfile.TemporaryDirectory() as tmp:
        export.export(model, tmp, fmt="padded")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    settings = search.Settings(target_ratio=_TARGET.value, **SETTINGS)
    peak = matmul_peak()
    print(
        f"SmolLM2-135M fp32, target {_TARGET.value}% (44:52:4, groups 256/192), "
        f"{block.shape[0]} block + {width.shape[0]} width rows of {_SEQLEN.value} tokens, "
        f"{jax.device_count()} fake CPU devices, torch {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})"
    )
    print(f"fp32 matmul peak (jitted 4096^3 jnp.dot, best of 5): {peak / 1e9:.1f} GFLOP/s")
    at_shapes = shape_peak(model.spec, _SEQLEN.value)
    print(
        f"fp32 matmuls at the model's own shapes ({_SEQLEN.value} tokens: one layer's "
        f"projections and attention, the LM head; jitted, best of 5): {at_shapes / 1e9:.1f} GFLOP/s"
    )
    forward = forward_rate(model, block)
    print(
        f"one dense forward per block row (our Scorer, batch 1, best of 5): {forward / 1e9:.1f} "
        f"GFLOP/s = {forward / at_shapes:.0%} of the rate at its shapes (the rest: norms, rotary, "
        "softmax, SiLU, log-sum-exp over the vocabulary)"
    )
    c = _CANDIDATES.value
    runs = [
        TorchReference(hf, model.spec, settings, rows, ignore).search(),
        _ours(model, rows, ignore, "ours, plain", (1, 1, 1), _with(settings, False, False)),
        _ours(model, rows, ignore, "ours + prefix cache", (1, 1, 1), _with(settings, True, False)),
        _ours(model, rows, ignore, "ours + cache + bound", (1, 1, 1), _with(settings, True, True)),
        _ours(
            model,
            rows,
            ignore,
            f"ours + cache + bound + {c} candidate groups",
            (c, 1, 1),
            _with(settings, True, True),
        ),
    ]
    reference = runs[0]
    head = f"{'variant':<44} {'wall s':>8} {'compile s':>9} {'TFLOP':>7} {'GFLOP/s':>8} {'peak':>5}"
    print(head + f" {'speed-up':>8} {'rows skipped':>12}  same decisions")
    for run in runs:
        print(
            f"{run.name:<44} {run.wall:8.1f} {run.compile:9.1f} {run.flops / 1e12:7.2f} "
            f"{run.flops / run.wall / 1e9:8.1f} {run.flops / run.wall / peak:5.0%} "
            f"{reference.wall / run.wall:7.2f}x {run.skipped:12.1%}  "
            f"{run.decisions == reference.decisions}"
        )
    print(f"decisions: {reference.decisions}")
    least = minimum_flops(model.spec, settings, reference.decisions, rows)
    limit = least / peak
    print(
        f"exact limit: {least / 1e12:.2f} TFLOP (one prefix pass per step, every candidate from "
        f"its own layer at its pruned shapes) / peak = {limit:.1f} s"
    )
    for run in runs[2:]:
        print(f"  {run.name}: {limit / run.wall:.0%} of the limit")
    shaped = least / at_shapes
    print(f"exact limit at the model's own matmul rate: {shaped:.1f} s")
    for run in runs[2:]:
        print(f"  {run.name}: {shaped / run.wall:.0%} of that limit")
    computed = _first_block_step(model, rows, ignore, computed=True)
    skipped = _first_block_step(model, rows, ignore, computed=False)
    for run in (computed, skipped):
        print(f"{run.name}: {run.wall:.1f} s, {run.flops / 1e12:.2f} TFLOP")
    print(
        f"skipping removed blocks: {computed.wall / skipped.wall:.2f}x faster, "
        f"{1 - skipped.flops / computed.flops:.1%} fewer FLOPs, same decision: "
        f"{computed.decisions == skipped.decisions}"
    )


def _with(settings: search.Settings, prefix_cache: bool, bound: bool) -> search.Settings:
    return dataclasses.replace(settings, prefix_cache=prefix_cache, bound=bound)


if __name__ == "__main__":
    app.run(main)
