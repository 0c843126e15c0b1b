"""What the docstrings, comments and docs point at exists.  A backticked reference, in the forms our
text uses, must resolve against the package as its source reads (``ast``; nothing is imported):

- a full name (``recall_dist.eval.shards.shard_key``): the module and the name in it;
- ``module.name`` where ``module`` is (the tail of) a module of the package (``shards.shard_key``,
  ``eval.shards``): the module defines or imports ``name``;
- ``thing.name`` where ``name`` is a module-level function or class of the package and ``thing`` is no
  module of any project: a stale module name (a plan.shard_key written where no plan module exists);
- ``Class.member`` for a class of the package (whose bases are all in the package): a member of it;
- a ``.py`` path: a file of the repository, or the tail of one (``eval/config.py``).

Not checked, because they cannot be told apart without running the code: attributes of objects
(``cfg.seed``, ``self.loss_head``), config keys (``train.resume``), other projects' names
(``torch.save``, ``Trainer.train``), and text outside backticks."""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recall_dist"
SKIP_DIRS = {".venv", ".git", "results", "runs", "__pycache__"}
TEXTS = ("recall_dist/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "launch/**/*.py", "docs/**/*.md", "*.md")
CONFIG_ROOTS = ("TrainConfig", "SweepConfig")  # ``section.key`` under these is a config key, not a module
NOT_OURS = {  # files of other projects that our text cites, and the README's placeholders
    "pretrain_gpt.py",  # Megatron-LM (integrations/megatron.py)
    "pipeline_parallel/schedules.py",
    "distributed/finalize_model_grads.py",
    "distributed/distributed_data_parallel.py",
    "recall_dist/x/y.py",  # README: "recall_dist/x/y.py <-> tests/x/test_y.py"
    "tests/x/test_y.py",
    "text_report.py",  # docs/demo-text/summary.md names fortunes_report.py's former name as such
}
OBJECTS = {"self", "cls"}
SHORT_ALIASES = {"np", "F", "nn", "tl", "dist", "plt", "pd"}  # third-party modules under their usual names
SPAN = re.compile(r"``([^`\s]+?)``|(?<!`)`([^`\s]+?)`(?!`)")
DOTTED = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?")


def _class_members(node: ast.ClassDef) -> tuple[set[str], dict[str, str]]:
    members, field_types = set(), {}
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
            field_types[item.target.id] = ast.unparse(item.annotation)
        elif isinstance(item, ast.Assign):
            members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    return members, field_types


@cache
def package_index() -> tuple[dict, dict, set]:
    """(modules: dotted name -> names it defines or imports, classes: name -> [(members, field types,
    bases)], the module-level functions and classes of the package)."""
    modules, classes, defs = {}, {}, set()
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
                defs.add(node.name)
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append((*_class_members(node), [ast.unparse(b) for b in node.bases]))
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        modules[".".join(parts)] = names
    for name in list(modules):  # a package's submodules are its names too
        if "." in name:
            parent, child = name.rsplit(".", 1)
            modules[parent].add(child)
    return modules, classes, defs


def members(cls: str) -> set[str] | None:
    """The members of a package class and its bases; None when a base lies outside the package."""
    _, classes, _ = package_index()
    out = set()
    for own, _, bases in classes[cls]:
        out |= own
        for base in bases:
            if base not in classes:
                return None
            inherited = members(base)
            if inherited is None:
                return None
            out |= inherited
    return out


def is_config_key(parts: list[str]) -> bool:
    _, classes, _ = package_index()
    for root in CONFIG_ROOTS:
        for _, field_types, _ in classes.get(root, []):
            section = field_types.get(parts[0])
            if section in classes and parts[1] in (members(section) or set()):
                return True
    return False


def _resolve(parts: list[str], exact: bool) -> str | None:
    """The longest prefix of ``parts`` that names a package module must hold the next part.
    ``exact``: the prefix is a full dotted name; else it may be the tail of one (``shards``)."""
    modules, _, _ = package_index()
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        found = [m for m in modules if m == prefix or (not exact and m.endswith("." + prefix))]
        if found:
            ok = any(parts[k] in modules[m] for m in found)
            return None if ok else f"{' / '.join(found)} has no {parts[k]}"
    return f"no module {parts[0]!r} in the package"


def module_reference_problem(parts: list[str]) -> str | None:
    """Why ``parts`` (a dotted reference) does not resolve in the package, or None."""
    modules, classes, defs = package_index()
    if parts[0] == "recall_dist":
        return _resolve(parts, exact=True)
    if parts[0] in classes:
        known = members(parts[0])
        return None if known is None or parts[1] in known else f"class {parts[0]} has no member {parts[1]}"
    if parts[0] in OBJECTS or parts[0][0].isupper() or is_config_key(parts):
        return None  # an object's attribute, another project's class, a config key: not decidable here
    module_names = {m.rsplit(".", 1)[-1] for m in modules}
    if parts[-1] not in defs and parts[-1] not in module_names:
        return None  # an attribute, a file name (``sweep.csv``), another project's name: not decidable
    if any(m == parts[0] or m.endswith("." + parts[0]) for m in modules):
        return _resolve(parts, exact=False)
    if parts[-1] not in defs or parts[0] in SHORT_ALIASES or importlib.util.find_spec(parts[0]) is not None:
        return None  # an attribute of some object, or another project's module
    return f"no module {parts[0]!r} in the package"


def file_reference_problem(ref: str, files: list[str]) -> str | None:
    if ref in NOT_OURS or any(f == ref or f.endswith("/" + ref) for f in files):
        return None
    return "no such file in the repository"


def references():
    """(file, line number, reference) of every backticked dotted name or ``.py`` path."""
    for pattern in TEXTS:
        for path in sorted(ROOT.glob(pattern)):
            if SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for match in SPAN.finditer(line):
                    yield path.relative_to(ROOT), number, match.group(1) or match.group(2)


def test_backticked_references_resolve():
    files = [
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*.py")
        if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
    ]
    problems = []
    for path, number, ref in references():
        if re.fullmatch(r"[\w/]+\.py", ref):
            problem = file_reference_problem(ref, files)
        elif (dotted := DOTTED.fullmatch(ref)) is not None:
            problem = module_reference_problem(dotted.group(1).split("."))
        else:
            continue
        if problem:
            problems.append(f"{path}:{number}: `{ref}`: {problem}")
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_it_is_for():
    # The stale references this test was written for (issue 31), and their fixed forms.
    assert module_reference_problem(["plan", "shard_key"]) == "no module 'plan' in the package"
    assert module_reference_problem(["metrics", "default_lambdas"]) == "no module 'metrics' in the package"
    assert module_reference_problem(["plan", "model_fingerprint"]) is not None
    assert module_reference_problem(["shards", "shard_key"]) is None
    assert module_reference_problem(["pr_metrics", "default_lambdas"]) is None
    assert module_reference_problem(["recall_dist", "eval", "shards", "model_fingerprint"]) is None
    assert "has no" in module_reference_problem(["known_support", "shard_key"])
    assert module_reference_problem(["SweepConfig", "no_such_field"]) == "class SweepConfig has no member no_such_field"
    for undecidable in (["cfg", "seed"], ["train", "resume"], ["torch", "manual_seed"], ["np", "ndarray"]):
        assert module_reference_problem(undecidable) is None
    assert file_reference_problem("eval/no_such.py", ["recall_dist/eval/config.py"]) is not None
    assert file_reference_problem("eval/config.py", ["recall_dist/eval/config.py"]) is None
