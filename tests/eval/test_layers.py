"""The sweep's modules import one way: config -> task -> shards -> run (sweep) -> aggregate -> driver / cli.
Read from the source (function-level imports included), so a new back-edge fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import recall_dist.eval

# Each module may import only modules of a strictly lower rank (leaves of pure maths and helpers at 0).
RANK = {
    "pr_metrics": 0,
    "summary": 0,
    "prompt_table": 0,
    "plot": 0,
    "tokens": 0,
    "generate": 0,
    "content_hash": 0,
    "config": 1,
    "known_support": 1,
    "support_file": 2,
    "tasks": 3,  # config -> the task (a support file is read here, not by the config)
    "loading": 2,
    "text": 2,
    "shards": 4,
    "sweep": 5,
    "aggregate": 6,
    "driver": 7,
    "cli": 8,
}


def _eval_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "recall_dist.eval":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("recall_dist.eval."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("recall_dist.eval.")}
    return found


def test_every_module_is_ranked():
    package = Path(recall_dist.eval.__file__).parent
    assert {p.stem for p in package.glob("*.py")} - {"__init__"} == set(RANK)


def test_imports_point_one_way():
    package = Path(recall_dist.eval.__file__).parent
    back_edges = [
        f"{name} -> {dep}"
        for name in RANK
        for dep in _eval_imports(package / f"{name}.py")
        if RANK[dep] >= RANK[name] and dep != name
    ]
    assert back_edges == []
