"""The demos' rules for reading a sweep: the tie tolerances, what raising T does to a curve
(``temperature_effect``), whether one curve dominates another plus temperature (``dominance``), and the
same per fine-tuning seed (``seed_statistics``, each seed paired with the reference of that seed).

Curves come from a sweep's ``sweep.csv``: ``read_curves`` (model -> points) and ``read_families``
(family -> seed -> points, from the ``family`` and ``seed`` columns the sweep writes for model entries that
set them; a model without them is its own family, seed 0).  The generic summary numbers of one curve
(max Recall, Recall at Precision >= p, PR AUC) stay in ``eval/summary.py``; nothing in eval reads this.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from recall_dist.eval.summary import recall_at_precision

# Recall differences within TOLERANCE count as ties in the verdicts (the demo's numbers are exact
# enumerations, but a re-run with another seed moves them by about this much).
TOLERANCE = 0.002
# A loss counts as reaching Precision P if it reaches P - PRECISION_TOLERANCE: at the cold end of the
# grid every model is at Precision 0.9999x, and a 2e-5 difference there says nothing about the losses.
PRECISION_TOLERANCE = 1e-4

Points = list[tuple[float, float, float]]  # (T, precision, recall), sorted by T


def read_curves(csv_path: Path) -> dict[str, Points]:
    """model -> [(T, precision, recall), ...] sorted by T, from a sweep's ``sweep.csv``."""
    curves: dict[str, list] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["model"], []).append(
                (float(row["temperature"]), float(row["precision"]), float(row["recall"]))
            )
    return {m: sorted(points) for m, points in curves.items()}


def read_families(csv_path: Path) -> dict[str, dict[int, Points]]:
    """family -> seed -> points, families in first-seen order, from the ``family`` and ``seed`` columns of
    ``sweep.csv`` (a model whose entry sets neither is its own family with seed 0).  A model's name is
    never parsed: ``foo-s3`` without a seed field is the family ``foo-s3``, seed 0."""
    labels: dict[str, tuple[str, int]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            seed = row.get("seed") or ""
            labels[row["model"]] = (row.get("family") or row["model"], int(seed) if seed else 0)
    out: dict[str, dict[int, Points]] = {}
    for model, points in read_curves(csv_path).items():
        family, seed = labels[model]
        if seed in out.setdefault(family, {}):
            raise ValueError(f"sweep.csv: two models of family {family!r} with seed {seed}")
        out[family][seed] = points
    return out


def recall_at(points: Points, min_precision: float) -> float:
    """Best Recall with Precision >= ``min_precision`` on the T-ordered curve (interpolated); NaN if none."""
    return recall_at_precision([p for _, p, _ in points], [r for _, _, r in points], min_precision)


def temperature_effect(points: Points, tol: float = TOLERANCE) -> dict:
    """What raising T above 1 does to the Recall of one model's curve."""
    by_t = {t: r for t, _, r in points}
    t_ref = min(by_t, key=lambda t: abs(t - 1.0))
    above = [(t, r) for t, r in by_t.items() if t > t_ref]
    t_best_above, r_best_above = max(above, key=lambda x: x[1]) if above else (math.nan, math.nan)
    t_max = max(by_t)
    return {
        "t_ref": t_ref,
        "recall_ref": by_t[t_ref],
        "t_max": t_max,
        "recall_t_max": by_t[t_max],
        "argmax_t": max(by_t, key=by_t.get),
        "max_recall": max(by_t.values()),
        "t_best_above": t_best_above,
        "recall_best_above": r_best_above,
        "rose": bool(above) and r_best_above > by_t[t_ref] + tol,
    }


def dominance(
    loss: Points, reference: Points, tol: float = TOLERANCE, precision_tol: float = PRECISION_TOLERANCE
) -> dict:
    """Does ``loss``'s curve dominate ``reference`` + temperature?  At the Precision P_i of every
    temperature point of the reference, gap_i = (best Recall of ``loss`` at Precision >= P_i) - (best
    Recall of the reference at Precision >= P_i): the reference's upper envelope, so a point where its
    curve turns back (less Precision *and* Recall at high T) is not an easy target.  A loss that never
    reaches P_i (less ``precision_tol``) counts as Recall 0 there.  Verdict: "dominates" if no gap <
    -tol and some gap > tol, "does not dominate" if no gap > tol, "mixed" otherwise."""
    gaps = []
    for _, p, _ in reference:
        best = recall_at(loss, p - precision_tol)
        gaps.append((0.0 if math.isnan(best) else best) - recall_at(reference, p))
    above, below = sum(g > tol for g in gaps), sum(g < -tol for g in gaps)
    if above and not below:
        verdict = "dominates"
    elif not above:
        verdict = "does not dominate"
    else:
        verdict = "mixed"
    return {"verdict": verdict, "above": above, "below": below, "points": len(gaps), "gaps": gaps}


def seed_statistics(
    families: dict[str, dict[int, Points]], reference: str, levels, tol: float = TOLERANCE
) -> dict[str, dict[int, dict]]:
    """Per family, per seed: Recall at each Precision level, max Recall, the paired margin over the
    reference of the same seed at each level, and the dominance verdict against it."""
    if reference not in families:
        raise ValueError(f"the sweep has no {reference!r} model to compare with; models: {', '.join(families)}")
    ref = families[reference]
    stats = {}
    for model, seeds in families.items():
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
