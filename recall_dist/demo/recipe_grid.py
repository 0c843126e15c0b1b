"""The recipe grids of the demos on a pretrained LM (``recall-dist demo-lm --grid``, ``recall-dist demo-text
--grid``): which settings, if any, let a recall loss beat NLL + temperature?

A grid is a list of points, ``pipeline.Setting``s (the shape of a demo's losses): a loss and its params,
and the lr / steps when they differ from the demo's config.  ``GridRecipe`` turns a demo's recipe
(``demo/pipeline.py``) into one whose fine-tunes are the points; ``run_grid`` fine-tunes and sweeps each
point on its own (so the grid can grow a point at a time: with ``--resume`` finished fine-tunes,
``pipeline.finished_run``, and their sweeps are reused), then writes ``grid.csv`` (every point x
temperature) and ``grid.md``.

Each point is read against the NLL point of the same lr, steps and seed (``pipeline.references``): its
Recall minus NLL's at the same Precision per Precision band (``demo/iso_report.band_margin``, with the
demo's bands and tie tolerance, fixed before the runs), its highest Precision and Recall over the
temperatures, and the training diagnostics of its ``metrics.jsonl``.  A setting *gains* when some band is
higher and none lower or out of its reach, *loses* when some band is lower or out of reach and none
higher, *mixed* when both, *ties* otherwise.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from recall_dist.demo.iso_report import band_label, band_margin, seed_range
from recall_dist.demo.pipeline import (
    DemoError,
    Prepared,
    Progress,
    Recipe,
    Run,
    Setting,
    references,
    seed_runs,
    yaml_flow,
)
from recall_dist.demo.verdicts import Points


def cdiv_point(name: str, lr: float | None = None, steps: int | None = None, **params) -> Setting:
    """A c-Div point: alpha 1.4 unless ``params`` says otherwise."""
    return Setting(name, "cdiv", {"alpha": 1.4, **params}, steps=steps, lr=lr)


def select(points: list[Setting], only: list[str] | None) -> list[Setting]:
    """``points`` named in ``only`` (all when None) plus the NLL references they need (``pipeline.references``),
    in grid order."""
    if not only:
        return list(points)
    by_name = {p.name: p for p in points}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise DemoError(f"--only: unknown grid point(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    refs = references(points)
    wanted = set(only) | {refs[n] for n in only if n in refs}
    return [p for p in points if p.name in wanted]


@dataclass(kw_only=True)
class GridRecipe(ABC):
    """Mixed in before a demo's recipe: its fine-tunes are ``points`` (lr and steps per point).  A demo's grid
    sets ``POINTS`` (the default grid), ``QUICK_POINTS`` (``--quick``), ``BANDS`` and ``tie()``."""

    POINTS: ClassVar[list[Setting]] = []
    QUICK_POINTS: ClassVar[list[str]] = ["cdiv-1.4"]
    BANDS: ClassVar[tuple[tuple[float, float], ...]] = ()

    points: list[Setting] = field(default_factory=list)  # empty: POINTS

    def __post_init__(self):
        if not self.points:
            self.points = list(self.POINTS)

    @abstractmethod
    def tie(self) -> float:
        """A margin within this is a tie."""

    @abstractmethod
    def grid_intro(self) -> str:
        """What one point trains and how it is swept (the first paragraph of ``grid.md``)."""

    def grid_sweep_overrides(self, prepared: Prepared) -> list[str]:
        """The overrides of every point's sweep besides its model, output directory and temperatures."""
        return list(prepared.sweep)

    def runs(self) -> list[Run]:
        """The points' runs (``pipeline.seed_runs``: seed 0 keeps the point's name, so ``--seeds 3 --resume``
        reuses a one-seed grid's runs; seed k > 0 is ``NAME-sK``)."""
        return seed_runs(self.points, self.seeds)


def run_grid(recipe: GridRecipe, resume: bool) -> Path:
    """Prepare once, then per run: fine-tune (reused when finished and ``resume``) and sweep (reused when the
    fine-tune was and its sweep exists); then ``grid.csv`` and ``grid.md``."""
    runs = recipe.runs()
    progress = Progress(recipe.prepare_stages() + 2 * len(runs))
    print(
        f"recall-dist {recipe.COMMAND} --grid: {len(recipe.points)} settings x {recipe.seeds} seed(s); "
        f"output in {recipe.out}",
        flush=True,
    )
    prepared = recipe.prepare(progress, resume)  # data for the longest point (``Recipe.max_steps``)
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
                *recipe.grid_sweep_overrides(prepared),
                f"models=[{run.model_entry(run_dir / 'final')}]",
                f"output_dir={sweep_dir}",
                f"temperatures=[{', '.join(f'{t:g}' for t in recipe.temperatures)}]",
            ],
            recipe.out / "logs" / f"sweep-{run.name}.log",
        )
    report = write_report(recipe, runs)
    print(f"{recipe.COMMAND} --grid done in {progress.elapsed() / 60:.1f} min: {report}", flush=True)
    return report


def write_report(recipe: GridRecipe, runs: list[Run]) -> Path:
    """``grid.csv`` and ``grid.md`` of ``runs`` (each swept in ``OUT/sweeps/``)."""
    rows = collect(recipe.out, runs)
    write_csv(rows, recipe.out / "grid.csv")
    report = recipe.out / "grid.md"
    report.write_text(grid_markdown(recipe, rows, training_diagnostics(recipe.out / "runs", runs)))
    return report


def report_only(recipe: GridRecipe) -> Path:
    """``--report``: the tables of every run of ``recipe`` (points x up to ``seeds`` seeds) that ``OUT`` holds
    swept, whatever call made it; trains and sweeps nothing."""
    runs = [r for r in recipe.runs() if (recipe.out / "sweeps" / r.name / "sweep.csv").is_file()]
    if not runs:
        raise DemoError(f"{recipe.out}: no swept grid point to report (run the grid first)")
    seeds = {}
    for r in runs:
        seeds.setdefault(r.family, []).append(r.seed)
    recipe.points = [p for p in recipe.points if p.name in seeds]
    recipe.seeds = max(len(v) for v in seeds.values())
    report = write_report(recipe, runs)
    print(f"{recipe.COMMAND} --grid --report: {len(runs)} runs of {len(recipe.points)} settings -> {report}")
    return report


def collect(out: Path, runs: list[Run]) -> list[dict]:
    """Every run's sweep rows: model, point, seed, temperature, precision, recall."""
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
        out.setdefault(r["point"], {}).setdefault(int(r["seed"]), []).append(
            (float(r["temperature"]), float(r["precision"]), float(r["recall"]))
        )
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


def point_statistics(points: list[Setting], data: dict[str, dict[int, Points]], bands: tuple, tie: float) -> list[dict]:
    """Per non-NLL point: band margins paired by seed with its NLL reference (``pipeline.references``), the
    verdict, and its and the reference's highest Precision and Recall over the temperatures."""
    refs = references(points, strict=False)
    out = []
    for p in points:
        if p.loss == "nll" or p.name not in data or refs.get(p.name) not in data:
            continue
        ref, seeds = data[refs[p.name]], data[p.name]
        common = sorted(set(ref) & set(seeds))
        per_band = {band: [band_margin(seeds[s], ref[s], band, tie=tie) for s in common] for band in bands}
        out.append(
            {
                "point": p,
                "reference": refs[p.name],
                "bands": per_band,
                "verdict": verdict(per_band),
                "seeds": len(common),
                "max_precision": [max(x[1] for x in seeds[s]) for s in common],
                "ref_max_precision": [max(x[1] for x in ref[s]) for s in common],
                "max_recall": [max(x[2] for x in seeds[s]) for s in common],
                "ref_max_recall": [max(x[2] for x in ref[s]) for s in common],
            }
        )
    return out


def training_diagnostics(runs_dir: Path, runs: list[Run]) -> dict[str, dict]:
    """run -> training NLL of the first and last logged step, and the means over logged steps of ESS / tokens,
    max / mean weight and the top-1% share (``metrics.jsonl``; a key no step logged is left out)."""
    out = {}
    for run in runs:
        path = runs_dir / run.name / "metrics.jsonl"
        if not path.is_file():
            continue
        steps = [r for r in map(json.loads, filter(str.strip, path.read_text().splitlines())) if "nll" in r]
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


def describe(p: Setting, recipe: GridRecipe) -> str:
    params = yaml_flow(p.params) if p.params else "{}"
    return f"{p.loss} {params}, lr {recipe.lr_of(p):g}, {p.steps or recipe.finetune_steps} steps"


def _band_cell(per_seed: list[dict]) -> str:
    kinds = [x["verdict"] for x in per_seed]
    kind = kinds[0] if len(set(kinds)) == 1 else "/".join(kinds)
    text = _num([x["margin"] for x in per_seed], signed=True)
    return kind if text == "n/a" else f"{text} {kind}"


def grid_markdown(recipe: GridRecipe, rows: list[dict], diagnostics: dict[str, dict]) -> str:
    data = curves(rows)
    tie = recipe.tie()
    stats = point_statistics(recipe.points, data, recipe.BANDS, tie)
    seeds = (
        "; with several seeds mean [min, max] over seeds, each paired with NLL of its seed" if recipe.seeds > 1 else ""
    )
    lines = [
        f"# {recipe.COMMAND} recipe grid",
        "",
        f"{len(recipe.points)} settings (NLL references included), up to {recipe.seeds} fine-tuning seed(s) each. "
        + recipe.grid_intro(),
        "",
        "Margins: the setting's Recall minus that of NLL with the same lr, steps and seed, at the same "
        f"Precision, averaged over each band's levels{seeds}; higher / lower beyond {tie:.3g}, tie within "
        "(fixed before the runs); 'NLL only': the setting reaches no level of the band at any temperature. "
        "Verdict: gains (some band higher, none lower or out of reach), loses (the reverse), mixed (both).",
        "",
        "| setting | "
        + " | ".join(band_label(b) for b in recipe.BANDS)
        + " | max P (NLL's) | max R (NLL's) | verdict |",
        "|---|" + "---|" * (len(recipe.BANDS) + 3),
    ]
    for s in stats:
        lines.append(
            f"| {s['point'].name}: {describe(s['point'], recipe)}"
            + (f", {s['seeds']} seed{'s' if s['seeds'] > 1 else ''}" if recipe.seeds > 1 else "")
            + " | "
            + " | ".join(_band_cell(s["bands"][band]) for band in recipe.BANDS)
            + f" | {_num(s['max_precision'])} ({_num(s['ref_max_precision'])}) | {_num(s['max_recall'])} "
            f"({_num(s['ref_max_recall'])}) | **{s['verdict']}** |"
        )
    for ref in dict.fromkeys(s["reference"] for s in stats):
        if len(data.get(ref, {})) > 1:  # what the fixed tolerance is to be read against
            spreads = [seed_range(data[ref], band) for band in recipe.BANDS]
            lines.append(
                f"| ({ref}'s seed-to-seed range: max - min Recall over its {len(data[ref])} seeds at the same "
                "Precision) | " + " | ".join("n/a" if math.isnan(x) else f"{x:.3f}" for x in spreads) + " | | | |"
            )
    lines += [
        "",
        "## Training diagnostics (`metrics.jsonl`: first and last logged step, means over logged steps)",
        "",
        "| run | training NLL first → last | ESS / tokens | max w / mean w | top 1% share |",
        "|---|---|---|---|---|",
    ]
    for name, d in diagnostics.items():
        lines.append(
            f"| {name} | {d['nll_first']:.3f} → {d['nll_last']:.3f} | {d.get('ess_fraction', math.nan):.3f} | "
            f"{d.get('weight_max_over_mean', math.nan):.2f} | {d.get('top1pct_share', math.nan):.3f} |"
        )
    first = {p: seeds[min(seeds)] for p, seeds in data.items()}
    lines += [
        "",
        "## Curves (Precision / Recall per temperature; the first seed)",
        "",
        "| T | " + " | ".join(first) + " |",
        "|---|" + "---|" * len(first),
    ]
    for t in sorted({float(r["temperature"]) for r in rows}):
        cells = []
        for points in first.values():
            at = [x for x in points if x[0] == t]
            cells.append(f"{at[0][1]:.3f} / {at[0][2]:.3f}" if at else "")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grid_main(grid_cls: type, base_cls: type[Recipe], description: str, argv: list[str] | None) -> int:
    """The ``--grid`` command line of a demo: ``grid_cls`` (a ``GridRecipe`` mixed into ``base_cls``)."""
    command = f"recall-dist {base_cls.COMMAND} --grid"
    p = argparse.ArgumentParser(
        prog=command, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=grid_cls.OUT, help=f"output directory (default: {grid_cls.OUT})")
    p.add_argument("--only", default=None, help="comma-separated grid points (their NLL references are added)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per point (default: 1)")
    p.add_argument("--model", default=None, help="causal LM directory or hub name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--resume", action="store_true", help="reuse the fine-tunes and sweeps --out already holds")
    p.add_argument("--quick", action="store_true", help="CI-sized: the demo's --quick sizes, NLL and c-Div 1.4 only")
    p.add_argument(
        "--report",
        action="store_true",
        help="only rewrite grid.md / grid.csv from the runs --out holds (up to --seeds)",
    )
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f"{command}: --seeds = {args.seeds}: must be >= 1", file=sys.stderr)
        return 2
    try:
        base = base_cls.quick() if args.quick else base_cls.full()
        only = args.only.split(",") if args.only else (grid_cls.QUICK_POINTS if args.quick else None)
        own = set(vars(grid_cls).get("__annotations__", {}))  # fields the grid declares again keep its defaults
        recipe = grid_cls(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(base_cls) if f.name not in {"out", *own}},
            out=Path(args.out).resolve(),
            points=select(grid_cls.POINTS, only),
        )
        recipe.seeds = args.seeds
        if args.model:
            recipe.model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
        report_only(recipe) if args.report else run_grid(recipe, args.resume)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 1
    return 0
