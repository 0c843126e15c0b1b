"""No import circle in ``recall_dist`` (STYLE.md: dependencies point one way), counting every import
statement in a module's file: the top-level ones, those inside functions (imported late, but still a
dependency) and those under ``if TYPE_CHECKING:`` (a type the module cannot name without the other).

The graph is read from the source with ``ast``, never by importing.  Its nodes are the modules of the
package; a package is its ``__init__.py``.  The edges, per import statement:

- ``import a.b.c`` and ``from a.b.c import name``: an edge to ``a.b.c`` (the module, or the package's
  ``__init__``), and ``from a.b import c`` where ``c`` is a submodule of ``a.b``: an edge to ``a.b.c``
  only, not to ``a.b``'s ``__init__`` (the name is the submodule, whatever the package re-exports);
- relative imports (``from .x import y``, ``from .. import z``) are resolved against the module's package;
- the parent packages that Python initialises before a submodule (importing ``a.b.c`` runs
  ``a/__init__`` and ``a/b/__init__`` first) are *not* edges: the importer uses none of their names, and
  counting them would make every package that re-exports its submodules a circle with each of them.
  A submodule that imports its own package (``from recall_dist.data import x`` inside ``data/``) is an
  edge to that ``__init__``, and a circle with the re-export; import the sibling module instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import recall_dist

PACKAGE_DIR = Path(recall_dist.__file__).parent
ROOT = "recall_dist"


def module_names(package_dir: Path = PACKAGE_DIR, root: str = ROOT) -> dict[str, Path]:
    """``{"recall_dist.data.dataset": path, "recall_dist.data": path/__init__.py, ...}``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (root, *path.relative_to(package_dir).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module a ``from ... import`` names (``from ..x import y`` in ``a.b.c`` -> ``a.x``)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` (its file ``path``) imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path)
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif target in modules:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR, root: str = ROOT) -> dict[str, set[str]]:
    modules = module_names(package_dir, root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component with more than one module (Tarjan's algorithm),
    written as a path ``[a, b, ..., a]`` through the component."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:  # the package has a few hundred modules: recursion depth is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle_through(graph, component) for component in components]


def _circle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle from the component's first module back to itself (breadth-first)."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no circle in component {sorted(component)}")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """A made-up package with each kind of import statement, and the circles it has."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub.a import thing\n",
        "sub/__init__.py": "",
        "sub/a.py": "def f():\n    from ..b import g\n",  # inside a function, relative
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import c\n",
        "sub/c.py": "import pkg.sub.a\n",  # c -> a -> b -> c
        "d.py": "from pkg import sub\nfrom . import b\n",  # a package and a submodule through `from pkg import`
        "e.py": "from pkg import thing\nimport os\n",  # the package's __init__ (a re-exported name)
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.sub.a"},
        "pkg.sub": set(),
        "pkg.sub.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.sub.a"},
        "pkg.d": {"pkg.sub", "pkg.b"},
        "pkg.e": {"pkg"},
    }
    assert find_cycles(graph) == [["pkg.b", "pkg.sub.c", "pkg.sub.a", "pkg.b"]]


def test_recall_dist_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "recall_dist.train.config" in graph["recall_dist.train.trainer"]
    cycles = find_cycles(graph)
    assert not cycles, "import circles (each: a -> b -> ... -> a):\n" + "\n".join(" -> ".join(c) for c in cycles)
