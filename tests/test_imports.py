"""The import graph of our code: no loops, and inference/evaluation need no training code.

Every ``import``/``from ... import`` in ``spl/``, ``spl_kernels/`` and the three scripts counts,
including imports inside functions (a lazy import only hides a loop until the function runs). The
graph is read from the source with ``ast``, so a new module is covered without listing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "sample.py", "evaluate.py")
TRAINING = ("spl.trainer", "spl.distributed", "spl.train_checkpoint", "spl.demo", "spl.reference")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("spl", "spl_kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in SCRIPTS:
        mods[script] = ROOT / script
    return mods


def _imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in known:
                c = c.rpartition(".")[0]
            if c and c != name:
                out.add(c)
    return out


GRAPH = {name: _imported(name, path, _modules()) for name, path in _modules().items()}


def _reach(start: str) -> dict[str, str]:
    """Every module reachable from ``start``, each with the module it was first reached from."""
    parent, todo = {}, [start]
    while todo:
        m = todo.pop()
        for dep in sorted(GRAPH.get(m, ())):
            if dep not in parent:
                parent[dep] = m
                todo.append(dep)
    return parent


def _path(parent: dict[str, str], start: str, end: str) -> str:
    chain = [end]
    while chain[-1] != start:
        chain.append(parent[chain[-1]])
    return " -> ".join(reversed(chain))


def test_the_graph_covers_the_known_edges():
    """The reader sees plain, lazy and package-relative imports (so the tests below can fail)."""
    assert "spl.logprobs" in GRAPH["spl.trainer"]
    assert "spl.trainer" in GRAPH["train.py"]
    assert "spl_kernels.fused_logprobs" in GRAPH["spl.logprobs"]  # imported inside a function
    assert len(GRAPH) > 40


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_loops(module):
    assert module not in _reach(module), "import loop: " + " -> ".join([module, *_loop(module)])


def _loop(module: str) -> list[str]:
    """A shortest loop back to ``module``, for the failure message."""
    frontier, seen = [[module]], {module}
    while frontier:
        nxt = []
        for chain in frontier:
            for dep in sorted(GRAPH.get(chain[-1], ())):
                if dep == module:
                    return chain[1:] + [module]
                if dep not in seen:
                    seen.add(dep)
                    nxt.append(chain + [dep])
        frontier = nxt
    return []


@pytest.mark.parametrize("module", ["sample.py", "evaluate.py", "spl.inference", "spl.sampling",
                                    "spl.global_temperature",
                                    *sorted(m for m in GRAPH if m.startswith("spl.evaluation"))])
def test_inference_and_evaluation_need_no_training_code(module):
    parent = _reach(module)
    for training in TRAINING:
        assert training not in parent, f"{module} reaches training code: {_path(parent, module, training)}"
