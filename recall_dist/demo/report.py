"""What the demo writes from a sweep's ``sweep.csv``: the statements and tables of ``summary.md``
(one seed, or mean and min-max over several fine-tuning seeds), and the high-Precision zoom figure.
Nothing is hard-coded: every number and verdict is computed here from the CSV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from recall_dist.eval.summary import (
    PRECISION_TOLERANCE,
    TOLERANCE,
    dominance,
    recall_at,
    seed_name,
    temperature_effect,
)

PRECISION_LEVELS = (0.9, 0.95, 0.99, 0.995)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def read_curves(csv_path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """model -> [(T, precision, recall), ...] sorted by T, from a sweep's ``sweep.csv``."""
    curves: dict[str, list] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["model"], []).append(
                (float(row["temperature"]), float(row["precision"]), float(row["recall"]))
            )
    return {m: sorted(points) for m, points in curves.items()}


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
        f"`sweep.csv` by `recall_dist/demo/report.py`."
        + (f" Wall time of the run: {fmt_time(wall_seconds)}." if wall_seconds is not None else ""),
        "",
        "Settings: "
        + "; ".join(loss_settings(recipe.losses))
        + (
            ". TruncR and lambda-PR run at their grid-best settings (`make demo-grid`, docs/demo/grid.md)."
            if {"truncr", "lambda_pr"} & {loss for _, loss, _ in recipe.losses}
            else "."
        ),
        "",
        scale_sentence(recipe.max_factor, n),
        "",
    ]


def loss_settings(losses) -> list[str]:
    """'model: rule(param=value, ...)' of every (model, loss, params), the rule's defaults filled in
    from the rule itself (so the report shows what ran, not what the demo passed)."""
    import inspect

    from recall_dist.losses import build_loss

    out = []
    for name, loss, params in losses:
        built = build_loss(loss, **params)
        keys = [k for k in inspect.signature(type(built.rule).__init__).parameters if k != "self"]
        shown = [f"{k}={getattr(built.rule, k)!r}" for k in keys if k in ("alpha", "lam", "drop", "granularity")]
        shown += [f"nll_mix={built.nll_mix:g}"] if built.nll_mix else []
        out.append(f"{name}: `{loss}({', '.join(shown)})`")
    return out


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def summary_markdown(
    curves: dict,
    reference: str = "nll",
    levels=PRECISION_LEVELS,
    recipe=None,
    wall_seconds: float | None = None,
    tol: float = TOLERANCE,
) -> str:
    """The text of summary.md from the curves of ``read_curves``."""
    if reference not in curves:
        raise ValueError(f"the sweep has no {reference!r} model to compare with; models: {', '.join(curves)}")
    ref = curves[reference]
    eff = temperature_effect(ref, tol)
    lines = ["# recall-dist demo: NLL + temperature vs recall-oriented losses", ""]
    if recipe is not None:
        lines += _intro(recipe, wall_seconds)
    lines += ["## Does raising the temperature buy NLL more Recall?", ""]
    delta = eff["recall_best_above"] - eff["recall_ref"]
    if eff["rose"]:
        lines.append(
            f"**Yes, by {delta:+.3f}**{' (slightly)' if delta < 5 * tol else ''}: "
            f"NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and "
            f"reaches {eff['recall_best_above']:.3f} at T={eff['t_best_above']:g} (best T > {eff['t_ref']:g})."
        )
    else:
        lines.append(
            f"**No**: NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and no T above it "
            f"raises it by more than {tol:g} (best above: {_num(eff['recall_best_above'])} at "
            f"T={eff['t_best_above']:g})."
        )
    precision_of = {t: p for t, p, _ in ref}
    lines.append(
        f"Over the grid its Recall peaks at T={eff['argmax_t']:g} ({eff['max_recall']:.3f}); at the largest "
        f"T={eff['t_max']:g} it is {eff['recall_t_max']:.3f}, and Precision has gone from "
        f"{precision_of[eff['t_ref']]:.3f} (T={eff['t_ref']:g}) to {precision_of[eff['t_max']]:.3f}: "
        f"1 - Precision is the mass the tempered model puts on invalid outputs."
    )
    lines += [
        "",
        "## Does a recall loss dominate NLL + temperature?",
        "",
        "Recall at matched Precision: the best Recall of each model's temperature curve (interpolated "
        "between grid points) among points with Precision >= p. n/a: the curve never reaches p.",
        "",
    ]
    header = ["model"] + [f"R @ P>={p:g}" for p in levels] + ["max R (T)", "verdict vs nll"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = {}
    for model, points in curves.items():
        best = max(points, key=lambda x: x[2])
        cells = [model] + [_num(recall_at(points, p)) for p in levels] + [f"{best[2]:.3f} (T={best[0]:g})"]
        if model == reference:
            cells.append("reference")
        else:
            d = dominance(points, ref, tol)
            verdicts[model] = d
            cells.append(f"{d['verdict']} ({d['above']} above, {d['below']} below of {d['points']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
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
    return "\n".join(lines) + "\n"


def split_seeds(curves: dict) -> dict[str, dict[int, list]]:
    """``{"nll-s0": ..., "nll-s1": ...}`` -> ``{"nll": {0: ..., 1: ...}}`` (a name without the
    ``-s<k>`` suffix is seed 0), models in first-seen order."""
    out: dict[str, dict[int, list]] = {}
    for model, points in curves.items():
        name, seed = seed_name(model)
        seed = 0 if seed is None else seed
        out.setdefault(name, {})[seed] = points
    return out


def seed_statistics(curves: dict, reference: str = "nll", levels=PRECISION_LEVELS, tol: float = TOLERANCE) -> dict:
    """Per model, per seed: Recall at each Precision level, max Recall, the paired margin over the
    reference of the same seed at each level, and the dominance verdict against it."""
    by_model = split_seeds(curves)
    if reference not in by_model:
        raise ValueError(f"the sweep has no {reference!r} model to compare with; models: {', '.join(by_model)}")
    ref = by_model[reference]
    stats = {}
    for model, seeds in by_model.items():
        missing = sorted(set(ref) - set(seeds))
        if missing:
            raise ValueError(f"model {model!r} lacks seed(s) {missing} that {reference!r} has")
        per_seed = {}
        for seed, points in sorted(seeds.items()):
            recall = {p: recall_at(points, p) for p in levels}
            per_seed[seed] = {
                "recall_at": recall,
                "max_recall": max(r for _, _, r in points),
                "margin": {p: recall[p] - recall_at(ref[seed], p) for p in levels},
                "verdict": None if model == reference else dominance(points, ref[seed], tol)["verdict"],
            }
        stats[model] = per_seed
    return stats


def spread(values, signed: bool = False) -> str:
    """'mean [min, max]' of the finite values (n/a if none; '(k of n)' when some are n/a)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    f = "+.3f" if signed else ".3f"
    text = f"{np.mean(finite):{f}} [{min(finite):{f}}, {max(finite):{f}}]"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)})"


def seeds_markdown(
    curves: dict, reference: str = "nll", levels=PRECISION_LEVELS, recipe=None, wall_seconds=None, tol=TOLERANCE
) -> str:
    """summary.md of a run with several fine-tuning seeds: mean [min, max] over seeds of every
    summary number, and margins over NLL paired by seed."""
    stats = seed_statistics(curves, reference, levels, tol)
    n_seeds = len(stats[reference])
    lines = ["# recall-dist demo: NLL + temperature vs recall-oriented losses, over seeds", ""]
    if recipe is not None:
        lines += _intro(recipe, wall_seconds)
    effects = [temperature_effect(points, tol) for points in split_seeds(curves)[reference].values()]
    gains = [e["recall_best_above"] - e["recall_ref"] for e in effects]
    lines += [
        "## Does raising the temperature buy NLL more Recall?",
        "",
        f"Best Recall at a T above {effects[0]['t_ref']:g} minus Recall at T = {effects[0]['t_ref']:g}, over "
        f"the {n_seeds} seeds: {spread(gains, signed=True)}; more than {tol:g} in {sum(e['rose'] for e in effects)} "
        f"of {n_seeds}. At the largest T = {effects[0]['t_max']:g} NLL's Recall is "
        f"{spread([e['recall_t_max'] for e in effects])}.",
        "",
        "## Does a recall loss dominate NLL + temperature?",
        "",
        f"Every cell is the mean [min, max] over {n_seeds} fine-tuning seeds. Recall at matched Precision: "
        "the best Recall of a model's temperature curve (interpolated between grid points) among points "
        "with Precision >= p.",
        "",
    ]
    header = ["model"] + [f"R @ P>={p:g}" for p in levels] + ["max R"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_seed in stats.items():
        cells = [spread([s["recall_at"][p] for s in per_seed.values()]) for p in levels]
        lines.append("| " + " | ".join([model, *cells, spread([s["max_recall"] for s in per_seed.values()])]) + " |")
    lines += [
        "",
        f"Margin over NLL of the same seed (Recall minus NLL's Recall at Precision >= p), and in how many "
        f"seeds the model dominates NLL + temperature (verdict as in a one-seed run, ties within {tol:g}):",
        "",
    ]
    header = ["model"] + [f"margin @ P>={p:g}" for p in levels] + ["dominates"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, per_seed in stats.items():
        if model == reference:
            continue
        cells = [spread([s["margin"][p] for s in per_seed.values()], signed=True) for p in levels]
        wins = sum(s["verdict"] == "dominates" for s in per_seed.values())
        lines.append("| " + " | ".join([model, *cells, f"{wins} of {n_seeds}"]) + " |")
    lines.append("")
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
    return "\n".join(lines) + "\n"


def plot_zoom(csv_path: Path, out_path: Path, reference: str = "nll") -> Path:
    """The high-Precision corner of the sweep, where the losses differ: Recall on x (zoomed on the
    reference's range), 1 - Precision on a log y axis (inverted: up is better), points labelled by T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(csv_path)
    by_model = split_seeds(curves)
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
    """summary.md from ``sweep.csv``: the one-seed report, or the over-seeds one when models carry ``-s<k>``."""
    curves = read_curves(csv_path)
    several = any(len(seeds) > 1 for seeds in split_seeds(curves).values())
    out_path.write_text((seeds_markdown if several else summary_markdown)(curves, **kwargs))
    return out_path
