"""The import graph of the package points one way: no module of ``multipruner_jax`` reaches itself
through its imports (function-level imports included), and the model definitions import nothing
of the package or of the scripts and benchmarks that sit on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "multipruner_jax"


def _module_names(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module below ``package`` (sub-folders included)."""
    base = ROOT / package
    names = {}
    for path in base.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the file of module ``name`` imports, anywhere in it."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*anchor, module] if module else anchor)
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    found.discard(name)
    found.discard(PACKAGE)  # the package's own __init__ is not a module of the graph
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = _module_names(package)
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the list of its modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph(PACKAGE)
    assert len(graph) > 20, "the package's modules were not found"
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_sub_packages_point_one_way():
    """By role folder: no cycle between packages, and ``base/`` imports none of the others."""
    packages: dict[str, set[str]] = {}
    for module, deps in _graph(PACKAGE).items():
        if module.count(".") < 2:
            continue
        packages.setdefault(module.split(".")[1], set()).update(
            dep.split(".")[1] for dep in deps if dep.count(".") >= 2
        )
    for name in packages:
        packages[name].discard(name)
    roles = {"base", "runtime", "storage", "prune", "exporting", "evals", "finetune"}
    assert roles <= set(packages)
    assert packages["base"] == set(), f"base/ imports {sorted(packages['base'])}"
    assert packages["runtime"] == {"base"}
    cycle = _cycle(packages)
    assert cycle is None, f"packages import each other: {' -> '.join(cycle or [])}"


def test_the_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    # the cycle this test was written against: the zero-shot adapter importing evaluation's loader
    real = _graph(PACKAGE)
    evaluation, adapter = f"{PACKAGE}.evals.evaluation", f"{PACKAGE}.evals.lm_eval_adapter"
    assert adapter in real[evaluation]
    real[adapter] = real[adapter] | {evaluation}
    assert _cycle(real) is not None


def test_the_graph_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from multipruner_jax.runtime import scoring\n    return scoring\n"
    )
    known = {"multipruner_jax.runtime.scoring", "multipruner_jax.m"}
    assert _imports(source, "multipruner_jax.m", known) == {"multipruner_jax.runtime.scoring"}


def test_models_import_nothing_above_them():
    for name, path in _module_names("models").items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                modules += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for module in modules:
                    top = module.split(".")[0]
                    assert top not in (PACKAGE, "scripts", "bench"), f"{name} imports {module}"


def test_the_package_imports_no_script_or_benchmark():
    for name, path in _module_names(PACKAGE).items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"scripts", "bench", "tests"} & set(tops), f"{name} imports {tops}"
