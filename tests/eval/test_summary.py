"""Summary numbers of a sweep curve against hand-computed values.  The demos' verdicts on such curves
(dominance, temperature effect, tolerances): tests/demo/test_verdicts.py."""

import math

import pytest

from recall_dist.eval import summary

# Temperature order: precision falls, recall rises, then recall falls again (T too high).
PREC = [0.99, 0.9, 0.6, 0.2]
REC = [0.1, 0.3, 0.5, 0.4]


def test_max_recall_and_recall_at_precision():
    assert summary.max_recall(PREC, REC) == 0.5
    assert summary.recall_at_precision(PREC, REC, 0.9) == pytest.approx(0.3)  # a grid point
    # 0.75 lies halfway between 0.9 (R 0.3) and 0.6 (R 0.5): R = 0.4
    assert summary.recall_at_precision(PREC, REC, 0.75) == pytest.approx(0.4)
    assert summary.recall_at_precision(PREC, REC, 0.1) == pytest.approx(0.5)
    assert math.isnan(summary.recall_at_precision(PREC, REC, 0.995))


def test_pr_auc_interpolated_precision():
    # p_interp = .99 on (0, .1], .9 on (.1, .3], .6 on (.3, .4] and (.4, .5]: the (.4, .2) point is dominated
    assert summary.pr_auc(PREC, REC) == pytest.approx(0.1 * 0.99 + 0.2 * 0.9 + 0.1 * 0.6 + 0.1 * 0.6)
    assert summary.pr_auc([0.8], [0.5]) == pytest.approx(0.4)
    assert summary.pr_auc([1.0, 1.0], [1.0, 0.3]) == pytest.approx(1.0)


def test_summarize_sorts_by_temperature():
    out = summary.summarize(
        [2.0, 0.5, 1.0, 1.5], [PREC[3], PREC[0], PREC[1], PREC[2]], [REC[3], REC[0], REC[1], REC[2]], 0.75
    )
    assert out["recall_at_precision"] == pytest.approx(0.4)
    assert out["temperature_at_max_recall"] == 1.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal-length"):
        summary.max_recall([0.5], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-empty"):
        summary.pr_auc([], [])


def test_the_library_holds_no_demo_rule():
    """Tolerances, verdicts and seed naming are the demos' (recall_dist/demo/verdicts.py), not eval's."""
    for name in ("TOLERANCE", "PRECISION_TOLERANCE", "SEED_SUFFIX", "seed_name", "dominance", "temperature_effect"):
        assert not hasattr(summary, name), name
