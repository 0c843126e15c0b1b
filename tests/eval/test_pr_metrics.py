"""Pure known-support metrics against hand-computed values, brute-force enumeration and closed forms."""

import itertools
import math

import numpy as np
import pytest

from recall_dist.eval import pr_metrics

# P uniform on {a, b}; Q puts 0.5 on a, 0.25 on b and 0.25 outside the support.
P = np.array([0.5, 0.5])
LOG_Q = np.log([0.5, 0.25])


def test_hand_computed_case():
    assert pr_metrics.precision(LOG_Q, P) == pytest.approx(0.75, abs=1e-15)
    # Recall@2 = 0.5 (1 - 0.5^2) + 0.5 (1 - 0.75^2) = 0.375 + 0.21875
    assert pr_metrics.recall_at_n(LOG_Q, P, 2) == pytest.approx(0.59375, abs=1e-15)
    assert pr_metrics.recall_at_n(LOG_Q, P, 1) == pytest.approx(0.375, abs=1e-15)  # = sum P Q
    alpha, beta = pr_metrics.pr_curve(LOG_Q, P, [0.5, 1.0, 2.0])
    np.testing.assert_allclose(alpha, [0.5, 0.75, 0.75], atol=1e-15)
    np.testing.assert_allclose(beta, [1.0, 0.75, 0.375], atol=1e-15)


def _brute_force_recall(q_full, p_full, n):
    """Mean and variance of the covered P-mass over every sequence of n draws (exact enumeration)."""
    values, probs = [], []
    for seq in itertools.product(range(len(q_full)), repeat=n):
        probs.append(math.prod(q_full[i] for i in seq))
        values.append(sum(p_full[i] for i in set(seq)))
    values, probs = np.array(values), np.array(probs)
    mean = float(probs @ values)
    return mean, float(probs @ (values - mean) ** 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_recall_and_its_variance_match_enumeration(n):
    q_support, p = np.array([0.4, 0.25, 0.15]), np.array([0.2, 0.5, 0.3])
    q_full = [*q_support, 0.2]  # last outcome: outside the support
    p_full = [*list(p), 0.0]
    mean, var = _brute_force_recall(q_full, p_full, n)
    assert pr_metrics.recall_at_n(np.log(q_support), p, n) == pytest.approx(mean, abs=1e-14)
    assert pr_metrics.recall_at_n_variance(np.log(q_support), p, n, chunk=2) == pytest.approx(var, abs=1e-14)


def test_extremes_are_finite_and_accurate():
    p = np.array([0.5, 0.5])
    tiny = np.array([-1000.0, -2000.0])  # Q ~ 1e-435: (1 - Q)^N must not round to 1 - 0 = 1 blindly
    assert pr_metrics.recall_at_n(tiny, p, 10**6) == pytest.approx(0.5 * 1e6 * math.exp(-1000.0), rel=1e-9)
    certain = np.array([0.0, -np.inf])  # Q(a) = 1, Q(b) = 0
    assert pr_metrics.recall_at_n(certain, p, 5) == pytest.approx(0.5, abs=1e-15)
    assert pr_metrics.precision(certain, p) == 1.0
    assert pr_metrics.recall_at_n_variance(certain, p, 5) == pytest.approx(0.0, abs=1e-15)
    near_one = np.array([np.log1p(-1e-12), np.log(1e-12) - 1])
    # 1 - (1 - q)^N with q = 1 - 1e-12, N = 2: 1 - 1e-24, exactly representable as 1.0 in float64
    assert pr_metrics.recall_at_n(near_one, p, 2) == pytest.approx(0.5 + 0.5 * (1 - (1 - 1e-12 / math.e) ** 2))


def test_pr_curve_limits():
    lams = pr_metrics.default_lambdas(41)
    assert lams[0] < 0.05 and lams[-1] > 20 and np.all(np.diff(lams) > 0)
    alpha, beta = pr_metrics.pr_curve(LOG_Q, P, lams)
    assert np.all(alpha <= 0.75 + 1e-15) and np.all(beta <= 1 + 1e-15)
    assert alpha[-1] == pytest.approx(0.75)  # lam -> inf: alpha -> Q(supp P) = precision
    assert beta[0] == pytest.approx(1.0)  # lam -> 0: beta -> P(supp Q) = 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="same support"):
        pr_metrics.precision([0.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="<= 0"):
        pr_metrics.precision([0.5], [1.0])
    with pytest.raises(ValueError, match="N >= 1"):
        pr_metrics.recall_at_n(LOG_Q, P, 0)
    with pytest.raises(ValueError, match="positive"):
        pr_metrics.pr_curve(LOG_Q, P, [0.0, 1.0])
