"""The demo's sweep stage before and after "one forward per sequence for every temperature",
measured in one run on the same models, machine and config.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sweep_bench.py [--models-dir results/demo/runs]
        [--suffix=-s0] [--before b286d4a] [--rounds 1] [--out /tmp/sweep_bench]

*before* is the package as it was at git revision ``--before`` (extracted with ``git archive``),
*after* is this working tree.  Each runs ``torchrun --nproc-per-node 2 -m recall_dist sweep
recall_dist/demo/configs/demo/sweep.yaml`` exactly as ``recall-dist demo`` does (11 temperatures, the 30x30
product task, the five fine-tuned models of a ``make demo`` run), in a fresh output directory:
once with the demo's sampled cross-check (``num_samples`` = 500 per temperature, sampling is per T
in both versions) and once exact-only (``num_samples=0``: teacher forcing alone).  Rounds alternate
before/after and the best wall time of each is kept, so load from other processes hits both alike.

Prints per version: wall time of the command (process start, imports and model loads included);
evaluation time (the slowest rank's time in ``compute_shard`` minus its model loads); teacher-forced
forward passes per support sequence (counted by wrapping ``LlamaForCausalLM.forward`` outside
``generate`` in every rank); the after/before ratios; and whether the two ``sweep.csv`` files are
byte-identical (else their largest difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BEFORE = "b286d4a"  # the parent of 147f5cb, which made the work item (model, prompt) at every T


def _worker(argv: list[str]) -> int:
    """One torchrun rank: count teacher-forced rows, then run ``recall-dist sweep``."""
    import transformers
    from transformers.generation.utils import GenerationMixin

    counts = {"teacher_forced_rows": 0, "teacher_forced_calls": 0, "generate_calls": 0}
    state = {"generating": False}
    forward, generate = transformers.LlamaForCausalLM.forward, GenerationMixin.generate

    def counting_forward(self, *args, **kwargs):
        if not state["generating"]:
            counts["teacher_forced_calls"] += 1
            counts["teacher_forced_rows"] += int(kwargs["input_ids"].shape[0])
        return forward(self, *args, **kwargs)

    def flagged_generate(self, *args, **kwargs):
        counts["generate_calls"] += 1
        state["generating"] = True
        try:
            return generate(self, *args, **kwargs)
        finally:
            state["generating"] = False

    transformers.LlamaForCausalLM.forward = counting_forward
    GenerationMixin.generate = flagged_generate
    import recall_dist
    import recall_dist.eval.sweep as sweep_module
    from recall_dist.eval.cli import main

    # Time the shards and, inside them, the model loads (both versions call these two functions).
    counts |= {"shard_seconds": 0.0, "load_seconds": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                counts[key] += time.perf_counter() - start

        return wrapper

    compute_shard = sweep_module.compute_shard
    timed_shard = timed(compute_shard, "shard_seconds")
    for module in [m for name, m in sys.modules.items() if name.startswith("recall_dist.eval")]:
        if getattr(module, "compute_shard", None) is compute_shard:  # also the driver's imported name
            module.compute_shard = timed_shard
    sweep_module.load_model = timed(sweep_module.load_model, "load_seconds")

    count_file, sweep_args = argv[0], argv[1:]
    code = main(sweep_args)
    with open(f"{count_file}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({**counts, "package": recall_dist.__file__}, f)
    return code


def _extract(rev: str, into: Path) -> Path:
    """The repository at ``rev`` (tracked files only), for running the old package."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _sweep(root: Path, models: list[tuple[str, Path]], out: Path, num_samples: int) -> dict:
    """Run the demo's sweep stage with the package under ``root``; wall time and counted forwards."""
    from recall_dist.demo import runner as demo
    from recall_dist.demo.stages import torchrun

    recipe = demo.ProductRecipe.full()
    listing = "[" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in models) + "]"
    count_file = out / "forward_counts"
    cmd = torchrun(
        str(Path(__file__).resolve()),
        "--worker",
        str(count_file),
        str(demo.CONFIG_DIR / "sweep.yaml"),  # the same config file (this tree's) for both versions
        f"models={listing}",
        f"output_dir={out}",
        f"task_params={{max_factor: {recipe.max_factor}}}",
        f"recall_at_n={recipe.recall_at_n}",
        f"num_samples={num_samples}",
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(root))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"sweep under {root} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    counts = [json.loads(p.read_text()) for p in sorted(out.glob("forward_counts.rank*"))]
    packages = {c.pop("package") for c in counts}
    if packages != {str(root / "recall_dist" / "__init__.py")}:
        raise RuntimeError(f"the sweep under {root} imported {packages}, not its own package")
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    # The ranks run in parallel: the slowest rank's evaluation (shards minus model loads) is the critical path.
    evaluation = max(c["shard_seconds"] - c["load_seconds"] for c in counts)
    return {"seconds": seconds, "evaluation": evaluation, **total}


def _csv_difference(a: Path, b: Path) -> tuple[bool, float, int]:
    """(byte-identical?, largest |difference| over numeric cells, rows compared)."""
    with open(a, newline="") as fa, open(b, newline="") as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    if [(r["model"], r["temperature"]) for r in rows_a] != [(r["model"], r["temperature"]) for r in rows_b]:
        raise RuntimeError(f"{a} and {b} do not hold the same (model, temperature) rows")
    worst = 0.0
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in set(ra) & set(rb) - {"model"}:
            worst = max(worst, abs(float(ra[key]) - float(rb[key])))
    return a.read_bytes() == b.read_bytes(), worst, len(rows_a)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="results/demo/runs", help="a demo run's runs/ (NAME/final per model)")
    p.add_argument("--suffix", default="", help="model dirs are NAME + suffix (--suffix=-s0 for a --seeds run)")
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' package")
    p.add_argument("--rounds", type=int, default=1, help="before/after rounds; the best time of each is kept")
    p.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()

    sys.path.insert(0, str(REPO))
    from recall_dist.demo import runner as demo

    models_dir = Path(args.models_dir).resolve()
    names = [name for name, *_ in demo.ProductRecipe.full().losses]
    models = [(n, models_dir / f"{n}{args.suffix}" / "final") for n in names]
    missing = [str(path) for _, path in models if not (path / "config.json").is_file()]
    if missing:
        print(f"sweep_bench: no fine-tuned models at {', '.join(missing)}; run `make demo` first", file=sys.stderr)
        return 2
    scratch = Path(args.out or tempfile.mkdtemp(prefix="sweep_bench-"))
    before_rev = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    after_rev = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    eval_changes = subprocess.run(
        ["git", "status", "--porcelain", "recall_dist/eval"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    after_rev += " (recall_dist/eval uncommitted changes!)" if eval_changes else " (recall_dist/eval as committed)"
    roots = {"before": _extract(before_rev, scratch / "before-src"), "after": REPO}
    from recall_dist.data import build_task

    support = len(build_task("product", max_factor=demo.ProductRecipe.full().max_factor).target_distribution(""))
    examples = support * len(models)
    print(f"before = {before_rev}, after = {after_rev}; {len(models)} models x {support} support sequences")
    print(f"{'num_samples':>11} {'version':>12} {'wall s':>8} {'eval s':>8} {'fwd/example':>12} {'generate calls':>15}")
    for num_samples in (demo.ProductRecipe.full().num_samples, 0):
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for version in ("before", "after") if r % 2 == 0 else ("after", "before"):
                out = scratch / f"{version}-n{num_samples}-r{r}"
                got = _sweep(roots[version], models, out, num_samples)
                if version not in best or got["seconds"] < best[version]["seconds"]:
                    best[version] = {**got, "csv": out / "sweep.csv"}
        for version in ("before", "after"):
            b = best[version]
            print(
                f"{num_samples:>11} {version:>12} {b['seconds']:>8.1f} {b['evaluation']:>8.1f} "
                f"{b['teacher_forced_rows'] / examples:>12.2f} {b['generate_calls']:>15}"
            )
        identical, worst, rows = _csv_difference(best["before"]["csv"], best["after"]["csv"])
        a, b = best["after"], best["before"]
        print(
            f"{num_samples:>11} {'after/before':>12} {a['seconds'] / b['seconds']:>8.3f} "
            f"{a['evaluation'] / b['evaluation']:>8.3f} {a['teacher_forced_rows'] / b['teacher_forced_rows']:>12.3f}   "
            f"sweep.csv: {rows} rows, {'byte-identical' if identical else f'max |diff| {worst:.3g}'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
