"""Summary numbers of one model's temperature sweep, for comparing models in a single line:
max Recall over T, Recall at Precision >= p, and the area under the (Recall, Precision) curve; and
the analyses of (T, Precision, Recall) curves the demos report: what raising T does to a model's Recall
(``temperature_effect``), and whether one curve dominates another plus temperature (``dominance``).

Input is the sweep's points ordered by temperature; pure Python, no model code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# Recall differences within TOLERANCE count as ties in the verdicts (the demo's numbers are exact
# enumerations, but a re-run with another seed moves them by about this much).
TOLERANCE = 0.002
# A loss counts as reaching Precision P if it reaches P - PRECISION_TOLERANCE: at the cold end of the
# grid every model is at Precision 0.9999x, and a 2e-5 difference there says nothing about the losses.
PRECISION_TOLERANCE = 1e-4
# Several fine-tuning seeds of one loss are swept as ``<name>-s<k>`` (``demo/runner.py``'s ``seed_runs``).
SEED_SUFFIX = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


def seed_name(model: str) -> tuple[str, int | None]:
    """``"cdiv-1.4-s2"`` -> ``("cdiv-1.4", 2)``; a name without the ``-s<k>`` suffix -> ``(name, None)``."""
    m = SEED_SUFFIX.match(model)
    return (m["name"], int(m["seed"])) if m else (model, None)


def _check(precision: Sequence[float], recall: Sequence[float]) -> None:
    if len(precision) != len(recall) or not precision:
        raise ValueError(f"precision ({len(precision)}) and recall ({len(recall)}) must be equal-length, non-empty")


def max_recall(precision: Sequence[float], recall: Sequence[float]) -> float:
    """The best Recall any temperature of the grid reaches."""
    _check(precision, recall)
    return max(recall)


def recall_at_precision(precision: Sequence[float], recall: Sequence[float], min_precision: float) -> float:
    """Largest Recall with Precision >= ``min_precision`` along the piecewise-linear curve joining
    consecutive temperatures (points in temperature order).  On a segment whose ends straddle the
    threshold, the crossing is interpolated linearly.  NaN when no point of the curve qualifies."""
    _check(precision, recall)
    best = -math.inf
    for i, (p, r) in enumerate(zip(precision, recall, strict=False)):
        if p >= min_precision:
            best = max(best, r)
        if i + 1 < len(precision):
            p2, r2 = precision[i + 1], recall[i + 1]
            if (p - min_precision) * (p2 - min_precision) < 0:  # strictly straddles the threshold
                t = (min_precision - p) / (p2 - p)
                best = max(best, r + t * (r2 - r))
    return best if best > -math.inf else math.nan


def pr_auc(precision: Sequence[float], recall: Sequence[float]) -> float:
    """Area under the interpolated PR curve of the grid's points: at recall r the precision is the
    best one reached at any recall >= r (the information-retrieval convention: a curve that turns
    back at high T, losing both Precision and Recall, is not penalised for the dominated points),
    integrated from Recall 0 to the largest Recall reached.  Between 0 and max-Recall x max-Precision."""
    _check(precision, recall)
    area, previous = 0.0, 0.0
    for r in sorted(set(recall)):
        best = max(p for p, rr in zip(precision, recall, strict=False) if rr >= r)
        area += (r - previous) * best
        previous = r
    return area


def summarize(
    temperatures: Sequence[float], precision: Sequence[float], recall: Sequence[float], min_precision: float
) -> dict:
    """All summary numbers of one curve (points given in any order; sorted by temperature here)."""
    order = sorted(range(len(temperatures)), key=lambda i: temperatures[i])
    prec = [precision[i] for i in order]
    rec = [recall[i] for i in order]
    best = max(order, key=lambda i: recall[i])
    return {
        "max_recall": max_recall(prec, rec),
        "temperature_at_max_recall": temperatures[best],
        "min_precision": min_precision,
        "recall_at_precision": recall_at_precision(prec, rec, min_precision),
        "pr_auc": pr_auc(prec, rec),
    }


def recall_at(points: list[tuple[float, float, float]], min_precision: float) -> float:
    """Best Recall with Precision >= ``min_precision`` on the T-ordered curve (interpolated); NaN if none."""
    return recall_at_precision([p for _, p, _ in points], [r for _, _, r in points], min_precision)


def temperature_effect(points: list[tuple[float, float, float]], tol: float = TOLERANCE) -> dict:
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


def dominance(loss: list, reference: list, tol: float = TOLERANCE, precision_tol: float = PRECISION_TOLERANCE) -> dict:
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
