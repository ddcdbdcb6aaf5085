"""LoRA recovery fine-tuning on pruned tiny models: adapters, steps, data, resume, merge, script."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models
from flax import nnx

from models import decoder
from models.spec import LayerSpec
from multipruner_jax.base import cli
from multipruner_jax.base import mesh as mesh_lib
from multipruner_jax.evals import evaluation
from multipruner_jax.exporting import export
from multipruner_jax.finetune import finetune_data, lora, recovery
from multipruner_jax.finetune.finetune_data import Example
from multipruner_jax.finetune.lora_trainer import Trainer, make_optimizer, make_schedule, masked_nll
from multipruner_jax.prune import surgery
from multipruner_jax.storage import assets, checkpoint, data, model_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1)


def _pruned(model):
    """``model`` shrunk so that layers differ: a removed attention block, a removed MLP block,
    fewer KV groups and narrower MLPs."""
    spec = model.spec
    kv, width = spec.num_key_value_heads, spec.intermediate_size
    layers = [
        spec.layers[0],
        LayerSpec(False, kv, True, width - 32),
        LayerSpec(True, max(kv // 2, 1), False, width),
        LayerSpec(True, max(kv // 2, 1), True, width // 2),
    ]
    return surgery.shrink(model, spec.replace_layers(layers))


def _randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    state = nnx.state(model, lora.LoraParam)
    nnx.update(
        model,
        jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), state),
    )


def _examples(rows, lengths, seed=0, vocab=tiny_models.BASE["vocab_size"]):
    """Random rows of the given lengths; targets are the second half of each row."""
    out = []
    for i, n in enumerate(lengths[:rows]):
        tokens = tiny_models.tokens(1, n, vocab, seed + i)[0]
        weights = np.zeros(n, np.float32)
        weights[n // 2 :] = 1.0
        out.append(Example(tokens, weights))
    return out


def _frozen_bytes(trainer):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(trainer.frozen)]


# -- adapters and merging ---------------------------------------------------------------------


_jitted_forward = jax.jit(
    lambda graphdef, state, t: nnx.merge(graphdef, state)(t), static_argnums=0
)


def _forward(model, tokens):
    """Logits of ``model`` (one compile per distinct graph)."""
    return np.asarray(_jitted_forward(*nnx.split(model), tokens))


@pytest.mark.parametrize("family", ["llama_gqa", "qwen2", "qwen3"])
def test_adapters_start_neutral_and_merge_exactly(family, tmp_path):
    model = _pruned(tiny_models.model(family))
    tokens = jnp.asarray(tiny_models.tokens(2, 12))
    base = _forward(model, tokens)
    # a removed block has no adapters: 7 + 4 (MLP only) + 3 (attention only) + 7
    assert lora.add_adapters(model, CONFIG) == 7 + 4 + 3 + 7
    spec = model.spec
    for layer, shape in zip(model.model.layers, spec.layers, strict=True):
        if shape.has_mlp:
            assert layer.mlp.gate_proj.lora_a[...].shape == (spec.hidden_size, 4)
            assert layer.mlp.down_proj.lora_a[...].shape == (shape.mlp_width, 4)
            assert layer.mlp.up_proj.lora_b[...].shape == (4, shape.mlp_width)
        if shape.has_attn:
            q = shape.kv_groups * spec.q_per_kv * spec.head_dim
            assert layer.self_attn.q_proj.lora_b[...].shape == (4, q)
            assert layer.self_attn.o_proj.lora_a[...].shape == (q, 4)
    # B = 0: every adapter adds exact zeros (the rest is another compiled program's rounding)
    x = jnp.ones((1, 2, spec.hidden_size))
    assert not np.asarray(model.model.layers[0].self_attn.q_proj.delta(x)).any()
    np.testing.assert_allclose(_forward(model, tokens), base, rtol=1e-6, atol=1e-6)
    _randomise_adapters(model)
    adapted = _forward(model, tokens)
    assert np.abs(adapted - base).max() > 1e-2
    lora.merge(model)
    assert not lora.lora_layers(model)
    expected = nnx.state(decoder.abstract(model.spec))
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(expected)
    np.testing.assert_allclose(_forward(model, tokens), adapted, atol=1e-5, rtol=1e-5)


def test_lora_config_and_adapter_sharding():
    with pytest.raises(ValueError, match="--lora_targets=q,x"):
        lora.LoraConfig(targets=("q", "x")).check()
    with pytest.raises(ValueError, match="--lora_dropout=1.0"):
        lora.LoraConfig(dropout=1.0).check()
    mesh = mesh_lib.make_mesh((4, 2))
    sharded = lora.adapter_sharding(mesh, "model.layers.0.self_attn.q_proj.lora_b", (4, 64))
    assert sharded.spec == jax.sharding.PartitionSpec(None, "model")
    sharded = lora.adapter_sharding(mesh, "model.layers.0.mlp.down_proj.lora_a", (96, 4))
    assert sharded.spec == jax.sharding.PartitionSpec("model", None)
    odd = lora.adapter_sharding(mesh, "model.layers.0.mlp.down_proj.lora_a", (33, 4))
    assert odd.spec == jax.sharding.PartitionSpec()


# -- training steps ---------------------------------------------------------------------------


def _trainer(
    mesh_shape=(1, 1), optimizer=None, dropout=0.0, targets=tuple(lora.TARGETS), model=None
):
    model = model or _pruned(tiny_models.model("llama_gqa"))
    lora.add_adapters(model, lora.LoraConfig(4, 8.0, dropout, targets), seed=3)
    optimizer = optimizer or make_optimizer(make_schedule(1e-2, 100, 0))
    return Trainer(model, optimizer, mesh_lib.make_mesh(mesh_shape), seed=5, token_chunk=64)


def test_training_lowers_the_loss_alike_on_1_and_8_devices_and_never_touches_the_base():
    examples = _examples(8, [20, 13, 24, 9, 17, 24, 11, 22])
    batches = finetune_data.plan_batches(examples, 4, (16, 24), 0, seed=None)
    trainer = _trainer()
    start, frozen = trainer.state(), _frozen_bytes(trainer)
    first = [trainer.step(batches[1:], s).loss for s in range(2)]
    sharded = _trainer((4, 2))  # rows on 4 "data" devices, adapters split over 2 "model"
    np.testing.assert_allclose(
        [sharded.step(batches[1:], s).loss for s in range(2)], first, rtol=1e-5
    )
    trainer.load_state(start)
    losses = [trainer.step(batches, s).loss for s in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert _frozen_bytes(trainer) == frozen
    assert trainer.evaluate(batches[1:])[0] < losses[0]
    # two bucket lengths compile the gradient twice, the update and the evaluation once
    assert trainer.compiles == 2 + 1 + 1


def test_gradient_accumulation_matches_one_large_batch():
    examples = _examples(8, [20, 13, 24, 9, 17, 24, 11, 22])
    one = finetune_data.plan_batches(examples, 8, (24,), 0, seed=None)
    four = [finetune_data.make_batch(examples[i : i + 2], 2, 32, 0) for i in range(0, 8, 2)]
    # dropout on adapters of three input widths (hidden, attention output, MLP width)
    trainer = _trainer(optimizer=optax.sgd(1.0), dropout=0.2, targets=("q", "o", "down"))
    start = trainer.state()
    results = []
    for batches in (one, four):
        trainer.load_state(start)
        step = trainer.step(batches, 0)
        results.append((step, [np.asarray(x) for x in jax.tree.leaves(trainer.adapters)]))
    (big, big_adapters), (acc, acc_adapters) = results
    assert big.targets == acc.targets == sum(e.targets for e in examples)
    assert acc.loss == pytest.approx(big.loss, rel=1e-6)
    for a, b in zip(big_adapters, acc_adapters, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_base_with_float32_adapters_and_optimizer(pruned_checkpoint):
    examples = _examples(4, [24, 13, 20, 9], vocab=300)
    batches = finetune_data.plan_batches(examples, 4, (24,), 0, seed=None)
    reference = checkpoint.restore(pruned_checkpoint[0])
    graphdef, state = nnx.split(reference)
    fp32_loss = jax.jit(lambda s, t, w: masked_nll(nnx.merge(graphdef, s), t, w, 64))(
        state, jnp.asarray(batches[0].tokens), jnp.asarray(batches[0].weights)
    )
    bf16 = checkpoint.restore(pruned_checkpoint[0], dtype=jnp.bfloat16)
    trainer = _trainer(model=bf16)
    frozen = _frozen_bytes(trainer)
    losses = [trainer.step(batches, s).loss for s in range(3)]
    assert losses[0] == pytest.approx(float(fp32_loss[0] / fp32_loss[1]), rel=2e-2)
    assert losses[2] < losses[0] and _frozen_bytes(trainer) == frozen
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer.state()) if x.ndim} == {jnp.dtype(jnp.float32)}


def test_masked_loss_counts_only_weighted_targets():
    model = _pruned(tiny_models.model("qwen2"))
    tokens = jnp.asarray(tiny_models.tokens(2, 10))
    weights = np.zeros((2, 10), np.float32)
    weights[0, 4:], weights[1, 7] = 1.0, 1.0
    graphdef, state = nnx.split(model)
    total, count = jax.jit(lambda s, t, w: masked_nll(nnx.merge(graphdef, s), t, w, token_chunk=4))(
        state, tokens, jnp.asarray(weights)
    )
    logp = jax.nn.log_softmax(_forward(model, tokens).astype(np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp)[:, :-1], np.asarray(tokens)[:, 1:, None], axis=-1)
    assert float(count) == 7
    assert float(total) == pytest.approx(float((nll[..., 0] * weights[:, 1:]).sum()), rel=1e-5)


# -- data -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    corpus = data.load_records(str(assets.sotu_dir()))[:400]
    return tiny_models.tiny_tokenizer(path, corpus)


def _records(count):
    """Alpaca-style records built from State of the Union sentences (real text)."""
    texts = data.load_records(str(assets.sotu_dir()))[: 2 * count]
    return [
        {
            "instruction": "Continue this passage of the address." if i % 2 else "Summarise.",
            "input": texts[2 * i][:120] if i % 2 else "",
            "output": texts[2 * i + 1][: 40 + 7 * i],
        }
        for i in range(count)
    ]


def test_instruction_example_masks_the_prompt(tokenizer):
    record = _records(2)[1]
    example = finetune_data.instruction_example(record, tokenizer, max_len=512)
    prompt = data.format_alpaca(record["instruction"], record["input"], "")
    assert prompt.endswith("### Response:\n")
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert example.tokens[-1] == tokenizer.eos_token_id
    assert not example.weights[:n_prompt].any() and example.weights[n_prompt:].all()
    assert tokenizer.decode(example.tokens[:-1]) == prompt + record["output"]
    short = finetune_data.instruction_example(record, tokenizer, max_len=n_prompt + 3)
    assert len(short.tokens) == n_prompt + 3 and short.targets == 3
    assert short.tokens[-1] != tokenizer.eos_token_id


def test_record_files_with_missing_fields_name_the_line(tmp_path):
    good = _records(3)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in good) + '\n{"instruction": "x"}\n')
    with pytest.raises(ValueError, match=rf"{jsonl}:4: .*'output' is missing"):
        finetune_data.read_records(str(jsonl))
    array = tmp_path / "r.json"
    array.write_text(json.dumps(good + [{"output": "y", "input": 3}], indent=1))
    line = max(i for i, text in enumerate(array.read_text().splitlines()) if text == " {") + 1
    with pytest.raises(ValueError, match=rf"{array}:{line}: .*'instruction' is missing"):
        finetune_data.read_records(str(array))
    array.write_text(json.dumps(good, indent=2))
    assert finetune_data.read_records(str(array)) == good
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: not valid JSON"):
        finetune_data.read_records(str(bad))
    with pytest.raises(ValueError, match="'nowhere/x.txt' matches nothing"):
        finetune_data.source_kind("nowhere/x.txt")


def test_heldout_split_is_the_datasets_split():
    import datasets

    rows = datasets.Dataset.from_dict({"i": list(range(50))})
    split = rows.train_test_split(test_size=7, seed=42)
    train, heldout = finetune_data.split_heldout(50, 7, seed=42)
    assert list(heldout) == split["test"]["i"] and list(train) == split["train"]["i"]
    with pytest.raises(ValueError, match="--eval_examples=50"):
        finetune_data.split_heldout(50, 50)


def test_text_rows_and_bucketed_batches(tokenizer, tmp_path):
    texts = [p.read_text() for p in sorted(assets.sotu_dir().glob("179*.txt"))]
    rows = finetune_data.text_examples(texts, tokenizer, 64)
    assert all(len(r.tokens) == 64 and r.targets == 63 for r in rows)
    assert finetune_data.source_kind(str(assets.sotu_dir() / "179*.txt")) == "text"
    assert len(finetune_data.read_texts(str(assets.sotu_dir() / "179*.txt"))) == len(texts)
    assert finetune_data.bucket_lengths(256, 4) == (64, 128, 192, 256)
    assert finetune_data.bucket_lengths(30, 4) == (8, 16, 24, 30)
    examples = [finetune_data.instruction_example(r, tokenizer, 96) for r in _records(40)]
    lengths = finetune_data.bucket_lengths(96, 3)
    stream = finetune_data.BatchStream(examples, 4, lengths, 0, seed=1)
    epoch = [stream.batch(m) for m in range(stream.per_epoch)]
    assert {b.tokens.shape for b in epoch} <= {(4, n) for n in lengths}
    assert sum(b.weights.sum() for b in epoch) == sum(e.targets for e in examples)
    again = finetune_data.BatchStream(examples, 4, lengths, 0, seed=1)
    later = stream.batch(stream.per_epoch + 2)
    np.testing.assert_array_equal(again.batch(stream.per_epoch + 2).tokens, later.tokens)
    assert not all(
        np.array_equal(a.tokens, stream.batch(stream.per_epoch + i).tokens)
        for i, a in enumerate(epoch)
    )


# -- the run: script, resume, merge -----------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("pruned")
    hf = str(path / "hf")
    tiny_models.save_hf_model(hf, "llama_gqa", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(hf)
    model = _pruned(model_loader.load_model(hf))
    checkpoint.save(str(path / "checkpoint"), model, tokenizer=tokenizer)
    records = path / "alpaca.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in _records(60)) + "\n")
    return str(path / "checkpoint"), str(records)


def _opts(pruned_checkpoint, out, **kw):
    model_path, records = pruned_checkpoint
    base = dict(
        model_path=model_path,
        output_path=str(out),
        data=records,
        eval_examples=8,
        max_len=160,
        buckets=2,
        micro_batch_size=4,
        grad_accum=2,
        max_steps=6,
        learning_rate=1e-2,
        warmup_steps=2,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.1,
        lora_targets="q,v,o,down",
        mesh_shape="2,1",
        token_chunk=16,
        eval_every=3,
        save_every=3,
        log_every=1,
        quiet=True,
    )
    return recovery.FinetuneOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def script_run(pruned_checkpoint, tmp_path_factory):
    """The script, uninterrupted, from a flagfile, with --merge."""
    tmp = tmp_path_factory.mktemp("script")
    opts = _opts(pruned_checkpoint, tmp / "out")
    flags = [f"--{k}={v}" for k, v in vars(opts).items() if not isinstance(v, bool)]
    flagfile = tmp / "run.flags"
    flagfile.write_text("# tiny recovery run\n" + "\n".join(flags) + "\n--merge\n--noquiet\n")
    script = os.path.join(REPO, "scripts", "finetune.py")
    done = subprocess.run(
        # a flag after --flagfile overrides it; same numerics as this process (highest precision)
        [sys.executable, script, f"--flagfile={flagfile}", "--save_every=2"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return opts, done


def test_script_trains_logs_checkpoints_and_merges(script_run, pruned_checkpoint, tmp_path):
    opts, done = script_run
    out = opts.output_path
    assert "step 6/6: loss" in done.stderr and "tokens/s" in done.stderr and "ETA" in done.stderr
    assert "merged checkpoint" in done.stdout
    written = open(os.path.join(out, "flags.txt")).read()
    assert "--merge" in written and "--save_every=2" in written
    log = json.load(open(os.path.join(out, recovery.LOG_FILE)))
    assert [e["step"] for e in log["steps"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log["evals"]] == [0, 3, 6]
    assert log["evals"][-1]["loss"] < log["evals"][0]["loss"]
    assert log["steps"][0]["lr"] == 0.0 and log["steps"][2]["lr"] == pytest.approx(1e-2)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["4", "6"]
    merged = os.path.join(out, "merged")
    provenance = json.load(open(os.path.join(merged, "recovery.json")))
    best = min(log["evals"], key=lambda e: e["loss"])
    assert provenance["step"] == best["step"] and provenance["eval_loss"] == best["loss"]
    base = checkpoint.load_spec(pruned_checkpoint[0])
    assert checkpoint.load_spec(merged) == base
    kernels = [
        checkpoint.restore(p).model.layers[0].self_attn.q_proj.kernel[...]
        for p in (pruned_checkpoint[0], merged)
    ]
    assert np.abs(np.asarray(kernels[1]) - np.asarray(kernels[0])).max() > 1e-4
    export.export_checkpoint(merged, str(tmp_path / "hf"))  # compact: the pruned shapes
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(data.load_records(str(assets.sotu_dir()))[:30]))
    kw = dict(dataset=str(text), seqlen=32, windows=2, mesh_shape="1,1", tasks="")
    ours = evaluation.evaluate(evaluation.EvalOptions(merged, **kw))["perplexity"]
    hf = evaluation.EvalOptions(str(tmp_path / "hf"), **kw)
    assert evaluation.evaluate(hf)["perplexity"] == pytest.approx(ours, rel=1e-5)


def test_resumed_run_repeats_the_uninterrupted_losses(script_run, pruned_checkpoint, tmp_path):
    """Resume a copy of the script's run as if it had been killed after update 5."""
    opts, _ = script_run
    out = tmp_path / "out"
    shutil.copytree(opts.output_path, out)
    shutil.rmtree(out / recovery.CHECKPOINTS_DIR / "6")
    shutil.rmtree(out / "merged")
    resumed = _opts(pruned_checkpoint, out, resume=True, save_every=2)
    with pytest.raises(ValueError, match="--learning_rate differ"):
        recovery.check_options(dataclasses.replace(resumed, learning_rate=0.1))
    summary = recovery.finetune(resumed)
    # updates 5 and 6 and the held-out loss after 6 are computed again from checkpoint 4
    log = _without_time(opts.output_path)
    assert _without_time(out) == log
    assert _orbax_bytes(out, "6") == _orbax_bytes(opts.output_path, "6")
    best = min(log["evals"], key=lambda e: e["loss"])["step"]
    assert summary["best_step"] == best and os.listdir(out / recovery.BEST_DIR) == [str(best)]


def _without_time(run):
    log = json.load(open(os.path.join(run, recovery.LOG_FILE)))
    return {**log, "steps": [{**e, "seconds": 0} for e in log["steps"]]}


def _orbax_bytes(run, step):
    """Raw bytes of every array of a run's checkpoint (no model needed)."""
    import orbax.checkpoint as ocp

    path = os.path.join(run, recovery.CHECKPOINTS_DIR, step)
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "opt_state"))
    tree = [tree, ocp.StandardCheckpointer().restore(os.path.join(path, "adapters"))]
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(micro_batch_size=3),
            "--micro_batch_size=3: expected a positive multiple of the mesh's data",
        ),
        (dict(warmup_steps=6), "--warmup_steps=6: expected fewer than --max_steps=6"),
        (dict(mesh_shape="2,4,1"), "only the search has a candidate axis"),
        (dict(lora_targets="q,qkv"), "--lora_targets=q,qkv"),
        (dict(schedule="step"), "--schedule='step'"),
        (dict(resume=True), "nothing to resume"),
        (dict(data="missing.jsonl"), "'missing.jsonl' matches nothing"),
        (dict(model_path="/nonexistent/model"), "--model_path='/nonexistent/model'"),
    ],
)
def test_bad_options_fail_before_loading(pruned_checkpoint, tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        recovery.check_options(_opts(pruned_checkpoint, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_compares_paths_resolved(pruned_checkpoint, tmp_path, monkeypatch):
    opts = _opts(pruned_checkpoint, tmp_path / "out")
    monkeypatch.chdir(os.path.dirname(opts.model_path))
    relative = dataclasses.replace(
        opts, model_path=os.path.basename(opts.model_path), data=os.path.relpath(opts.data)
    )
    assert relative.identity() == opts.identity()
    assert dataclasses.replace(opts, data="other.jsonl").identity() != opts.identity()


# -- one run per output folder (issue 17) -------------------------------------------------------


def test_a_second_run_on_a_live_runs_folder_is_refused(pruned_checkpoint, tmp_path):
    from test_concurrency import _hold_lock

    from multipruner_jax.base import ownership

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        with pytest.raises(ownership.FolderBusy, match=f"pid {holder.pid}"):
            recovery.finetune(_opts(pruned_checkpoint, out))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_resume_refuses_the_state_of_another_run(script_run, pruned_checkpoint, tmp_path):
    opts, _ = script_run
    out = tmp_path / "out"
    shutil.copytree(opts.output_path, out)
    run = json.loads((out / recovery.RUN_FILE).read_text())
    assert len(run["run_id"]) == 32
    (out / recovery.RUN_FILE).write_text(json.dumps({**run, "run_id": "0" * 32}))
    with pytest.raises(ValueError, match=r"checkpoints/6 was written by another run"):
        recovery.finetune(_opts(pruned_checkpoint, out, resume=True, save_every=2))


def test_a_failed_save_is_one_sentence_and_leaves_no_temporary_folder(
    pruned_checkpoint, tmp_path, monkeypatch
):
    import errno

    import orbax.checkpoint as ocp

    out = tmp_path / "out"
    stale = out / recovery.CHECKPOINTS_DIR / "9.orbax-checkpoint-tmp-1234"
    stale.mkdir(parents=True)  # a killed run's save: removed when the next run starts
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if "checkpoints" not in str(self.directory):
            return real_save(self, step, *args, **kwargs)
        (out / recovery.CHECKPOINTS_DIR / f"{step}.orbax-checkpoint-tmp-99").mkdir()
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            raise RuntimeError("orbax: save failed") from error

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(OSError) as caught:
        recovery.finetune(_opts(pruned_checkpoint, out))
    assert cli.one_line(caught.value) == (
        f"{out / recovery.CHECKPOINTS_DIR / '3'}: No space left on device"
    )
    assert os.listdir(out / recovery.CHECKPOINTS_DIR) == []
