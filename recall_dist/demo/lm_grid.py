"""``recall-dist demo-lm --grid``: the recipe grid of the known-support demo.  Which settings, if any, let
c-Div beat NLL + temperature on a real pretrained LM?

    recall-dist demo-lm --grid [--out results/demo-lm-grid] [--only NAME,NAME] [--seeds S] [--resume]

Every point fine-tunes the demo's model on the demo's data (``demo/iso.py``: the swept training prompts,
``configs/demo_lm/finetune.yaml``) and is swept exactly on those prompts (``configs/demo_lm/sweep.yaml``).
One factor at a time moves away from the centre (c-Div alpha 1.4, lr 1e-4, 56 steps of 16 examples):

- alpha in {1.1, 1.2, 1.4, 2.0};
- ``max_weight`` 2 (alpha 1.4: tokens with q < 0.18 get weight 2 instead of up to q^-0.4);
- ``nll_mix`` 0.5;
- lr 3e-5 and 112 steps, each with NLL at the same lr and steps as its own reference.

Each point is compared with the NLL run of the same lr, steps and seed: its Recall minus NLL's at the same
Precision per Precision band (``demo/iso_report.band_margin``: the tie tolerance, 0.01, is fixed in advance),
its highest Precision at any temperature, and the training diagnostics of its ``metrics.jsonl``.  A
setting *gains* when some band is higher and none is lower or out of reach, *loses* when some band is lower
or out of reach and none higher, and is *mixed* or *ties* otherwise.

Fine-tunes and sweeps already in ``OUT`` (same config, steps and seed: ``pipeline.finished_run``) are reused
with ``--resume``, so the grid can grow a point at a time.  Writes ``OUT/grid.csv`` (every point x
temperature), ``OUT/grid.md`` (the tables and verdicts) and one sweep per point in ``OUT/sweeps/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recall_dist.demo.iso import IsoRecipe
from recall_dist.demo.iso_report import BANDS as SUMMARY_BANDS
from recall_dist.demo.iso_report import TIE, band_label, band_margin
from recall_dist.demo.pipeline import DemoError, Progress, Run, yaml_flow
from recall_dist.demo.verdicts import Points

# demo-lm's summary bands plus one below them: at 56 steps NLL's Precision spans about 0-0.85 (docs/demo-lm/probe.md)
BANDS = ((0.25, 0.5), *SUMMARY_BANDS)


@dataclass(frozen=True)
class GridPoint:
    """One setting: a model name, the loss and its params, and the lr / steps when they differ from the centre."""

    name: str
    loss: str
    params: dict = field(default_factory=dict)
    lr: float | None = None
    steps: int | None = None

    def reference(self) -> str:
        """The NLL point with this point's lr and steps."""
        suffix = (f"-lr{self.lr:g}" if self.lr is not None else "") + (f"-{self.steps}steps" if self.steps else "")
        return "nll" + suffix


def _cdiv(name: str, lr: float | None = None, steps: int | None = None, **params) -> GridPoint:
    return GridPoint(name, "cdiv", {"alpha": 1.4, **params}, lr, steps)


POINTS = [  # in the order they run: the settings most likely to move the verdict first
    GridPoint("nll", "nll"),
    _cdiv("cdiv-1.4"),
    _cdiv("cdiv-1.1", alpha=1.1),
    _cdiv("cdiv-1.4-maxw2", max_weight=2.0),
    GridPoint("nll-112steps", "nll", steps=112),
    _cdiv("cdiv-1.4-112steps", steps=112),
    _cdiv("cdiv-1.2", alpha=1.2),
    _cdiv("cdiv-1.4-mix0.5", nll_mix=0.5),
    _cdiv("cdiv-2.0", alpha=2.0),
    GridPoint("nll-lr3e-05", "nll", lr=3e-5),
    _cdiv("cdiv-1.4-lr3e-05", lr=3e-5),
]


def select(points: list[GridPoint], only: list[str] | None) -> list[GridPoint]:
    """``points`` named in ``only`` (all when None) plus the NLL references they need, in grid order."""
    if not only:
        return list(points)
    by_name = {p.name: p for p in points}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise DemoError(f"--only: unknown grid point(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    wanted = set(only) | {by_name[n].reference() for n in only}
    return [p for p in points if p.name in wanted]


@dataclass(kw_only=True)
class GridRecipe(IsoRecipe):
    """The demo-lm recipe whose fine-tunes are the grid's points (lr and steps per point)."""

    OUT = "results/demo-lm-grid"
    points: list[GridPoint] = field(default_factory=lambda: list(POINTS))

    def runs(self) -> list[Run]:
        return [
            Run(p.name if self.seeds == 1 else f"{p.name}-s{s}", p.name, p.loss, p.params, s, self.seeds > 1)
            for s in range(self.seeds)
            for p in self.points
        ]

    def point(self, run: Run) -> GridPoint:
        return next(p for p in self.points if p.name == run.family)

    def steps_of(self, run: Run) -> int:
        return self.point(run).steps or self.finetune_steps

    def finetune_overrides(self, prepared, run: Run, run_dir: Path) -> list[str]:
        point, steps = self.point(run), self.steps_of(run)
        return [
            *super().finetune_overrides(prepared, run, run_dir),
            f"train.max_steps={steps}",
            f"data.num_samples={steps * self.global_batch}",
            *([f"optim.lr={point.lr}"] if point.lr is not None else []),
        ]


def run_grid(recipe: GridRecipe, resume: bool) -> Path:
    """Prepare once, then per run: fine-tune (reused when finished and ``resume``) and sweep (reused when the
    fine-tune was and its sweep exists); then ``grid.csv`` and ``grid.md``."""
    runs = recipe.runs()
    max_steps = max(recipe.steps_of(r) for r in runs)
    progress = Progress(recipe.prepare_stages() + 2 * len(runs))
    print(
        f"recall-dist demo-lm --grid: {len(recipe.points)} settings x {recipe.seeds} seed(s); output in {recipe.out}",
        flush=True,
    )
    # the data file holds enough examples for the longest point; a shorter one reads its first rows
    prepared = dataclasses.replace(recipe, finetune_steps=max_steps).prepare(progress, resume)
    support = recipe.out / "data" / "support_train.jsonl"
    for run in runs:
        run_dir = recipe.out / "runs" / run.name
        steps = recipe.steps_of(run)
        key = f"fine-tune {run.name}"
        progress.train(
            f"{key} ({steps} steps)",
            recipe.CONFIG_DIR / "finetune.yaml",
            recipe.finetune_overrides(prepared, run, run_dir),
            run_dir,
            steps,
            resume,
            key=key,
        )
        sweep_dir = recipe.out / "sweeps" / run.name
        if progress.times[key] is None and (sweep_dir / "sweep.csv").is_file():
            print(f"{progress.next_label()} sweep {run.name}: reused ({sweep_dir})", flush=True)
            continue
        progress.times[f"sweep {run.name}"] = progress.stage(
            f"sweep {run.name}",
            [
                "sweep",
                str(recipe.CONFIG_DIR / "sweep.yaml"),
                f"models=[{run.model_entry(run_dir / 'final')}]",
                f"output_dir={sweep_dir}",
                f"temperatures=[{', '.join(f'{t:g}' for t in recipe.temperatures)}]",
                f"support={support}",
            ],
            recipe.out / "logs" / f"sweep-{run.name}.log",
        )
    rows = collect(recipe.out, runs)
    write_csv(rows, recipe.out / "grid.csv")
    report = recipe.out / "grid.md"
    report.write_text(grid_markdown(recipe, rows, training_diagnostics(recipe.out / "runs", runs)))
    print(f"demo-lm --grid done in {progress.elapsed() / 60:.1f} min: {report}", flush=True)
    return report


def collect(out: Path, runs: list[Run]) -> list[dict]:
    """Every run's sweep rows: model, family (the point), seed, temperature, precision, recall."""
    rows = []
    for run in runs:
        with open(out / "sweeps" / run.name / "sweep.csv", newline="") as f:
            for r in csv.DictReader(f):
                rows.append(
                    {
                        "model": run.name,
                        "point": run.family,
                        "seed": run.seed,
                        "temperature": float(r["temperature"]),
                        "precision": float(r["precision"]),
                        "recall": float(r["recall"]),
                    }
                )
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def curves(rows: list[dict]) -> dict[str, dict[int, Points]]:
    """point -> seed -> [(T, precision, recall)] sorted by T."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["point"], {}).setdefault(r["seed"], []).append((r["temperature"], r["precision"], r["recall"]))
    return {p: {s: sorted(v) for s, v in seeds.items()} for p, seeds in out.items()}


def verdict(per_band: dict[tuple, list[dict]]) -> str:
    """gains / loses / mixed / ties over the bands (module docstring); 'n/a' when no band is reached by either."""
    verdicts = [s["verdict"] for stats in per_band.values() for s in stats]
    higher = any(v in ("higher", "loss only") for v in verdicts)
    lower = any(v in ("lower", "NLL only") for v in verdicts)
    if higher and lower:
        return "mixed"
    if higher:
        return "gains"
    if lower:
        return "loses"
    return "ties" if "tie" in verdicts else "n/a"


def point_statistics(points: list[GridPoint], data: dict[str, dict[int, Points]]) -> list[dict]:
    """Per non-reference point: band margins paired by seed with its NLL reference, the verdict, and its and
    the reference's highest Precision and best Recall over the temperatures."""
    out = []
    for p in points:
        if p.loss == "nll" or p.name not in data or p.reference() not in data:
            continue
        ref, seeds = data[p.reference()], data[p.name]
        common = sorted(set(ref) & set(seeds))
        per_band = {band: [band_margin(seeds[s], ref[s], band) for s in common] for band in BANDS}
        out.append(
            {
                "point": p,
                "bands": per_band,
                "verdict": verdict(per_band),
                "max_precision": [max(x[1] for x in seeds[s]) for s in common],
                "ref_max_precision": [max(x[1] for x in ref[s]) for s in common],
                "max_recall": [max(x[2] for x in seeds[s]) for s in common],
                "ref_max_recall": [max(x[2] for x in ref[s]) for s in common],
            }
        )
    return out


def training_diagnostics(runs_dir: Path, runs: list[Run]) -> dict[str, dict]:
    """run -> training NLL of the first and last logged step, mean ESS / tokens, max/mean weight and top-1%
    share over the logged steps (``metrics.jsonl``; missing keys are left out)."""
    out = {}
    for run in runs:
        path = runs_dir / run.name / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r for r in records if "nll" in r]
        if not steps:
            continue
        stats = {"nll_first": steps[0]["nll"], "nll_last": steps[-1]["nll"]}
        for key in ("ess_fraction", "weight_max_over_mean", "top1pct_share"):
            values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
            if values:
                stats[key] = float(np.mean(values))
        out[run.name] = stats
    return out


def _num(values: list[float], signed: bool = False) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    fmt = "+.3f" if signed else ".3f"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{np.mean(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def describe(p: GridPoint, recipe: GridRecipe) -> str:
    params = yaml_flow(p.params) if p.params else "{}"
    lr = p.lr if p.lr is not None else recipe_lr(recipe)
    return f"{p.loss} {params}, lr {lr:g}, {p.steps or recipe.finetune_steps} steps"


def recipe_lr(recipe: GridRecipe) -> float:
    from recall_dist.configtree import load_yaml

    return float(load_yaml(recipe.CONFIG_DIR / "finetune.yaml")["optim"]["lr"])


def grid_markdown(recipe: GridRecipe, rows: list[dict], diagnostics: dict[str, dict]) -> str:
    data = curves(rows)
    stats = point_statistics(recipe.points, data)
    lines = [
        "# demo-lm recipe grid",
        "",
        f"{len(recipe.points)} settings x {recipe.seeds} seed(s); each fine-tunes SmolLM2-135M-Instruct (or the "
        f"demo's `--model`) on the demo's training prompts ({recipe.global_batch} chat examples per step, 2 processes, "
        f"FSDP2) and is swept exactly on {recipe.train_prompts} training prompts at {len(recipe.temperatures)} "
        f"temperatures ({min(recipe.temperatures):g}-{max(recipe.temperatures):g}): Precision = Q_T(answers), "
        "Recall@100, means over the prompts.  Margins: the setting's Recall minus that of NLL with the same lr, "
        f"steps and seed, at the same Precision, per band; higher / lower beyond {TIE:g}, tie within "
        "(`demo/iso_report.py`); 'NLL only': the setting reaches no level of the band at any temperature.",
        "",
        "| setting | " + " | ".join(band_label(b) for b in BANDS) + " | max P (NLL's) | max R@100 (NLL's) | verdict |",
        "|---|" + "---|" * (len(BANDS) + 3),
    ]
    for s in stats:
        cells = []
        for band in BANDS:
            per_seed = s["bands"][band]
            margins = [x["margin"] for x in per_seed]
            kinds = [x["verdict"] for x in per_seed]
            text = _num(margins, signed=True)
            kind = kinds[0] if len(set(kinds)) == 1 else "/".join(kinds)
            cells.append(kind if text == "n/a" else f"{text} {kind}")
        lines.append(
            f"| {s['point'].name}: {describe(s['point'], recipe)} | "
            + " | ".join(cells)
            + f" | {_num(s['max_precision'])} ({_num(s['ref_max_precision'])}) | {_num(s['max_recall'])} "
            f"({_num(s['ref_max_recall'])}) | **{s['verdict']}** |"
        )
    lines += [
        "",
        "## Training diagnostics (`metrics.jsonl`, means over logged steps)",
        "",
        "| run | training NLL first → last | ESS / tokens | max w / mean w | top 1% share |",
        "|---|---|---|---|---|",
    ]
    for name, d in diagnostics.items():
        lines.append(
            f"| {name} | {d['nll_first']:.3f} → {d['nll_last']:.3f} | {d.get('ess_fraction', math.nan):.3f} | "
            f"{d.get('weight_max_over_mean', math.nan):.2f} | {d.get('top1pct_share', math.nan):.3f} |"
        )
    lines += [
        "",
        "## Curves (mean over the swept prompts; seed 0)",
        "",
        "| T | " + " | ".join(f"{p} P / R" for p in data) + " |",
        "|---|" + "---|" * len(data),
    ]
    temps = sorted({r["temperature"] for r in rows})
    for t in temps:
        cells = []
        for seeds in data.values():
            at = [x for x in seeds[min(seeds)] if x[0] == t]
            cells.append(f"{at[0][1]:.3f} / {at[0][2]:.3f}" if at else "")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recall-dist demo-lm --grid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=GridRecipe.OUT)
    p.add_argument("--only", default=None, help="comma-separated grid points (their NLL references are added)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--model", default=None, help="causal LM directory or hub name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--resume", action="store_true", help="reuse finished fine-tunes and sweeps in --out")
    p.add_argument("--quick", action="store_true", help="CI-sized: demo-lm --quick's sizes, NLL and c-Div 1.4 only")
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f"recall-dist demo-lm --grid: --seeds = {args.seeds}: must be >= 1", file=sys.stderr)
        return 2
    try:
        base = IsoRecipe.quick() if args.quick else IsoRecipe.full()
        only = args.only.split(",") if args.only else (["cdiv-1.4"] if args.quick else None)
        recipe = GridRecipe(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(IsoRecipe) if f.name != "out"},
            out=Path(args.out).resolve(),
            points=select(POINTS, only),
        )
        recipe.seeds = args.seeds
        if args.model:
            recipe.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        run_grid(recipe, args.resume)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"recall-dist demo-lm --grid: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
