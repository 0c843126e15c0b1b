"""What ``recall-dist demo`` writes from a sweep's ``sweep.csv``: the statements and tables of ``summary.md``
(one seed, or mean and min-max over several fine-tuning seeds; on the skeleton of ``demo/markdown.py``,
verdicts by ``demo/verdicts.py``), and the high-Precision zoom figure.  Nothing is hard-coded: every number
and verdict is computed here from the CSV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from recall_dist.demo.markdown import (
    TEMPERATURE_QUESTION,
    Section,
    loss_settings,
    num,
    summary_document,
    table,
    wall_time_sentence,
)
from recall_dist.demo.verdicts import (
    PRECISION_TOLERANCE,
    TOLERANCE,
    dominance,
    read_families,
    recall_at,
    seed_statistics,
    spread,
    temperature_effect,
)

PRECISION_LEVELS = (0.9, 0.95, 0.99, 0.995)
DOMINANCE_QUESTION = "Does a recall loss dominate NLL + temperature?"


def scale_sentence(max_factor: int, recall_at_n: int) -> str:
    """Recall@N of the target P itself (a perfect NLL model at T=1) and of the best flattening
    P^(1/a) on the support (the sequence-level picture of what c-Div aims at): the room a loss has."""
    from recall_dist.data import build_task
    from recall_dist.eval.pr_metrics import recall_at_n as recall_of

    p = np.array(list(build_task("product", max_factor=max_factor).target_distribution("").values()))
    flattened = {}
    for a in np.round(np.arange(1.0, 4.01, 0.1), 1):
        q = p ** (1.0 / a)
        flattened[float(a)] = recall_of(np.log(q / q.sum()), p, recall_at_n)
    best_a = max(flattened, key=flattened.get)
    room = flattened[best_a] - flattened[1.0]
    return (
        f"For scale: a model equal to the target P has Precision 1 and Recall@{recall_at_n} = "
        f"{flattened[1.0]:.3f}; the best flattening of P on its support, P^(1/a), reaches "
        f"{flattened[best_a]:.3f} (a = {best_a:g}), {room:+.3f} above it at T = 1. Below Precision 1 the "
        f"gaps can be larger: NLL must cool down (and lose Recall) to reach a high Precision."
    )


def _intro(recipe, wall_seconds: float | None) -> list[str]:
    n = recipe.recall_at_n
    seeds = getattr(recipe, "seeds", 1)
    same = (
        "same data, seed, learning rate"
        if seeds == 1
        else (
            f"same learning rate; repeated with {seeds} fine-tuning seeds: seed k sets the batch order and "
            f"the fresh samples, the pre-trained model is shared"
        )
    )
    return [
        f"Task: products a*b of a, b ~ U{{1..{recipe.max_factor}}} (known sparse target). A tiny Llama is "
        f"pre-trained with NLL for {recipe.pretrain_steps} steps, then fine-tuned from that checkpoint "
        f"with each loss for {recipe.finetune_steps} steps ({same}; 2 processes, "
        f"FSDP2 on CPU). Precision = Q_T(supp P); Recall = Recall@{n}, the expected P-mass covered by "
        f"{n} samples; both exact (enumeration of the support). Every number below is computed from "
        f"`sweep.csv` by `recall_dist/demo/report.py`." + wall_time_sentence(wall_seconds),
        "",
        "Settings: "
        + "; ".join(loss_settings(recipe.losses))
        + (
            ". TruncR and lambda-PR run at their grid-best settings (`make demo-grid`, docs/demo/grid.md)."
            if {"truncr", "lambda_pr"} & {s.loss for s in recipe.losses}
            else "."
        ),
        "",
        scale_sentence(recipe.max_factor, n),
        "",
    ]


def summary_markdown(
    families: dict[str, dict[int, list]],
    reference: str = "nll",
    levels=PRECISION_LEVELS,
    recipe=None,
    wall_seconds: float | None = None,
    tol: float = TOLERANCE,
) -> str:
    """The text of summary.md from the curves of ``verdicts.read_families``: the one-seed report, or the
    over-seeds one (mean [min, max] of every number, margins paired by seed) when a model has several seeds."""
    if reference not in families:
        raise ValueError(f"the sweep has no {reference!r} model to compare with; models: {', '.join(families)}")
    intro = _intro(recipe, wall_seconds) if recipe is not None else []
    title = "recall-dist demo: NLL + temperature vs recall-oriented losses"
    if all(len(seeds) == 1 for seeds in families.values()):
        curves = {model: next(iter(seeds.values())) for model, seeds in families.items()}
        sections = [_temperature_section(curves[reference], tol), _dominance_section(curves, reference, levels, tol)]
        return summary_document(title, intro, sections)
    stats = seed_statistics(families, reference, levels, tol)
    sections = [
        _seeds_temperature_section(families[reference], tol),
        _seeds_dominance_section(stats, reference, levels, tol),
    ]
    return summary_document(title + ", over seeds", intro, sections)


def _temperature_section(ref: list, tol: float) -> Section:
    eff = temperature_effect(ref, tol)
    delta = eff["recall_best_above"] - eff["recall_ref"]
    if eff["rose"]:
        answer = (
            f"**Yes, by {delta:+.3f}**{' (slightly)' if delta < 5 * tol else ''}: "
            f"NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and "
            f"reaches {eff['recall_best_above']:.3f} at T={eff['t_best_above']:g} (best T > {eff['t_ref']:g})."
        )
    else:
        answer = (
            f"**No**: NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and no T above it "
            f"raises it by more than {tol:g} (best above: {num(eff['recall_best_above'])} at "
            f"T={eff['t_best_above']:g})."
        )
    precision_of = {t: p for t, p, _ in ref}
    return Section(
        TEMPERATURE_QUESTION,
        [
            answer,
            f"Over the grid its Recall peaks at T={eff['argmax_t']:g} ({eff['max_recall']:.3f}); at the largest "
            f"T={eff['t_max']:g} it is {eff['recall_t_max']:.3f}, and Precision has gone from "
            f"{precision_of[eff['t_ref']]:.3f} (T={eff['t_ref']:g}) to {precision_of[eff['t_max']]:.3f}: "
            f"1 - Precision is the mass the tempered model puts on invalid outputs.",
        ],
    )


def _dominance_section(curves: dict, reference: str, levels, tol: float) -> Section:
    ref = curves[reference]
    rows, verdicts = [], {}
    for model, points in curves.items():
        best = max(points, key=lambda x: x[2])
        cells = [model] + [num(recall_at(points, p)) for p in levels] + [f"{best[2]:.3f} (T={best[0]:g})"]
        if model == reference:
            cells.append("reference")
        else:
            d = dominance(points, ref, tol)
            verdicts[model] = d
            cells.append(f"{d['verdict']} ({d['above']} above, {d['below']} below of {d['points']})")
        rows.append(cells)
    lines = [
        "Recall at matched Precision: the best Recall of each model's temperature curve (interpolated "
        "between grid points) among points with Precision >= p. n/a: the curve never reaches p.",
        "",
        *table(["model"] + [f"R @ P>={p:g}" for p in levels] + ["max R (T)", "verdict vs nll"], rows),
        "",
        f"Verdict: at the Precision P_i of each of NLL's {len(ref)} temperature points, the model's best "
        f"Recall at Precision >= P_i - {PRECISION_TOLERANCE:g} is compared with NLL's at Precision >= P_i "
        f"(ties within {tol:g}). *dominates*: never below and "
        f"sometimes above; *does not dominate*: never above; *mixed*: both.",
        "",
    ]
    for model, d in verdicts.items():
        diffs = [recall_at(curves[model], p) - recall_at(ref, p) for p in levels]
        shown = ", ".join(
            f"P>={p:g}: {'n/a' if math.isnan(x) else f'{x:+.3f}'}" for p, x in zip(levels, diffs, strict=False)
        )
        lines.append(f"- **{model}** vs NLL + temperature: **{d['verdict']}** (Recall minus NLL's at {shown}).")
    return Section(DOMINANCE_QUESTION, lines)


def _seeds_temperature_section(ref_seeds: dict[int, list], tol: float) -> Section:
    effects = [temperature_effect(points, tol) for points in ref_seeds.values()]
    gains = [e["recall_best_above"] - e["recall_ref"] for e in effects]
    n_seeds = len(effects)
    return Section(
        TEMPERATURE_QUESTION,
        [
            f"Best Recall at a T above {effects[0]['t_ref']:g} minus Recall at T = {effects[0]['t_ref']:g}, over "
            f"the {n_seeds} seeds: {spread(gains, signed=True)}; more than {tol:g} in "
            f"{sum(e['rose'] for e in effects)} of {n_seeds}. At the largest T = {effects[0]['t_max']:g} NLL's "
            f"Recall is {spread([e['recall_t_max'] for e in effects])}."
        ],
    )


def _seeds_dominance_section(stats: dict, reference: str, levels, tol: float) -> Section:
    n_seeds = len(stats[reference])
    recall_rows, margin_rows = [], []
    for model, per_seed in stats.items():
        seeds = per_seed.values()
        recall = [spread([s["recall_at"][p] for s in seeds]) for p in levels]
        recall_rows.append([model, *recall, spread([s["max_recall"] for s in seeds])])
        if model != reference:
            margins = [spread([s["margin"][p] for s in seeds], signed=True) for p in levels]
            wins = sum(s["verdict"] == "dominates" for s in seeds)
            margin_rows.append([model, *margins, f"{wins} of {n_seeds}"])
    lines = [
        f"Every cell is the mean [min, max] over {n_seeds} fine-tuning seeds. Recall at matched Precision: "
        "the best Recall of a model's temperature curve (interpolated between grid points) among points "
        "with Precision >= p.",
        "",
        *table(["model"] + [f"R @ P>={p:g}" for p in levels] + ["max R"], recall_rows),
        "",
        f"Margin over NLL of the same seed (Recall minus NLL's Recall at Precision >= p), and in how many "
        f"seeds the model dominates NLL + temperature (verdict as in a one-seed run, ties within {tol:g}):",
        "",
        *table(["model"] + [f"margin @ P>={p:g}" for p in levels] + ["dominates"], margin_rows),
        "",
    ]
    for model, per_seed in stats.items():
        if model == reference:
            continue
        held = [p for p in levels if all(s["margin"][p] > tol for s in per_seed.values())]
        lost = [p for p in levels if all(s["margin"][p] < -tol for s in per_seed.values())]
        if held:
            verdict = f"above NLL by more than {tol:g} in every seed at P >= {', '.join(f'{p:g}' for p in held)}"
        elif lost:
            verdict = f"below NLL by more than {tol:g} in every seed at P >= {', '.join(f'{p:g}' for p in lost)}"
        else:
            verdict = "no level where every seed is more than the tie tolerance above (or below) NLL"
        lines.append(f"- **{model}**: {verdict}.")
    return Section(DOMINANCE_QUESTION, lines)


def plot_zoom(csv_path: Path, out_path: Path, reference: str = "nll") -> Path:
    """The high-Precision corner of the sweep, where the losses differ: Recall on x (zoomed on the
    reference's range), 1 - Precision on a log y axis (inverted: up is better), points labelled by T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model = read_families(csv_path)
    curves = {(model, seed): points for model, seeds in by_model.items() for seed, points in seeds.items()}
    ref_recalls = [r for points in by_model[reference].values() for _, _, r in points]
    top = max(r for points in curves.values() for _, _, r in points)
    lo = min(ref_recalls) - 0.25 * (top - min(ref_recalls))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for i, (model, seeds) in enumerate(by_model.items()):
        first = min(seeds)  # one labelled curve per model; other seeds thin, unlabelled
        for seed, points in sorted(seeds.items()):
            xs = [r for _, _, r in points]
            ys = [max(1.0 - p, 1e-7) for _, p, _ in points]
            style = {"lw": 1.8, "ms": 5, "label": model} if seed == first else {"lw": 0.8, "ms": 2, "alpha": 0.6}
            ax.plot(xs, ys, "-o", color=f"C{i}", **style)
        for t, p, r in seeds[first]:
            if r >= lo:
                ax.annotate(
                    f"{t:g}",
                    (r, max(1.0 - p, 1e-7)),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=f"C{i}",
                )
    ax.set_xlim(lo, top + 0.1 * (top - lo))
    ax.set_yscale("log")
    shown = [max(1.0 - p, 1e-7) for points in curves.values() for _, p, r in points if r >= lo]
    ax.set_ylim(min(shown) / 2, max(shown) * 2)
    ax.invert_yaxis()
    ax.set_xlabel(f"Recall@{read_recall_at_n(csv_path)}")
    ax.set_ylabel("1 - Precision  (mass on invalid outputs, log scale)")
    seeds_note = f", {len(by_model[reference])} seeds: thin lines" if len(by_model[reference]) > 1 else ""
    ax.set_title(f"High-Precision corner of the sweep (labels: temperature T{seeds_note})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)
    return out_path


def read_recall_at_n(csv_path: Path) -> str:
    with open(csv_path, newline="") as f:
        return next(csv.DictReader(f)).get("recall_at_n", "N")


def write_summary(csv_path: Path, out_path: Path, **kwargs) -> Path:
    """summary.md from ``sweep.csv``: the one-seed report, or the over-seeds one when a model has several
    seeds (the sweep's ``seed`` column)."""
    out_path.write_text(summary_markdown(read_families(csv_path), **kwargs))
    return out_path
