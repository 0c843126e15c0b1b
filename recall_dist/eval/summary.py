"""Summary numbers of one model's temperature sweep, for comparing models in a single line:
max Recall over T, Recall at Precision >= p, and the area under the (Recall, Precision) curve.

Input is the sweep's points ordered by temperature; pure Python, no model code.  The demos' readings
of these curves (tie tolerances, dominance verdicts, seeds) live in ``recall_dist/demo/verdicts.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
