"""Known-support Precision/Recall as pure functions of (log Q_T over the support of P, P).

No model code here: the sweep computes ``log_q[i] = log Q_T(x_i)`` for every x_i in supp P
(teacher forcing, ``known_support.py``) and these functions turn it into the numbers the sweep
reports (README, "Temperature sweep").
Mass of Q_T outside the support never enters except through ``1 - precision``.  Everything runs in
float64 and in log space where a probability can underflow (``(1 - q)^N`` for q ~ 1e-30, N ~ 1e4).
"""

from __future__ import annotations

import numpy as np


def _as_arrays(log_q, p) -> tuple[np.ndarray, np.ndarray]:
    log_q = np.asarray(log_q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if log_q.shape != p.shape or log_q.ndim != 1:
        raise ValueError(f"log_q {log_q.shape} and p {p.shape} must be 1-D arrays over the same support")
    if np.any(log_q > 1e-9):
        raise ValueError(f"log_q must be <= 0 (log-probabilities); max is {log_q.max()}")
    return np.minimum(log_q, 0.0), p


def log1mexp(log_q: np.ndarray) -> np.ndarray:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012: switch at -log 2)."""
    a = np.asarray(log_q, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(a > -np.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))


def precision(log_q, p) -> float:
    """Precision = Q_T(supp P) = sum_{x in supp P} Q_T(x)."""
    log_q, _ = _as_arrays(log_q, p)
    return float(np.exp(log_q).sum())


def miss_probabilities(log_q, n: int) -> np.ndarray:
    """(1 - Q_T(x))^n: the probability that x is absent from n i.i.d. samples of Q_T."""
    return np.exp(n * log1mexp(log_q))


def recall_at_n(log_q, p, n: int) -> float:
    """Recall@N = sum_x P(x) (1 - (1 - Q_T(x))^N): the expected P-mass of the distinct samples
    among N i.i.d. draws of Q_T (the estimand of the sampled recall)."""
    log_q, p = _as_arrays(log_q, p)
    if n < 1:
        raise ValueError(f"n = {n}: Recall@N needs N >= 1")
    return float(np.sum(p * -np.expm1(n * log1mexp(log_q))))


def recall_at_n_variance(log_q, p, n: int, chunk: int = 1024) -> float:
    """Variance of the sampled recall C = sum_x P(x) 1[x among N draws of Q_T].

    With a_x = (1 - q_x)^N: Var 1_x = a_x - a_x^2 and, for x != y,
    Cov(1_x, 1_y) = (1 - q_x - q_y)^N - a_x a_y (x and y both absent).  O(S^2) time, O(chunk * S) memory.
    """
    log_q, p = _as_arrays(log_q, p)
    q = np.exp(log_q)
    a = miss_probabilities(log_q, n)
    var = float(np.sum(p * p * (a - a * a)))
    for start in range(0, len(q), chunk):
        rows = slice(start, start + chunk)
        both_absent = np.clip(1.0 - q[rows, None] - q[None, :], 0.0, 1.0) ** n
        cov = both_absent - a[rows, None] * a[None, :]
        idx = np.arange(start, min(start + chunk, len(q)))
        cov[idx - start, idx] = 0.0  # the diagonal is the variance term above
        var += float(p[rows] @ cov @ p)
    return max(var, 0.0)


def pr_curve(log_q, p, lambdas) -> tuple[np.ndarray, np.ndarray]:
    """PR curve of Q_T against P (Simon et al. 2019; Verine et al. 2023):
    alpha_lam = sum_x min(lam P(x), Q_T(x)) (precision-like), beta_lam = alpha_lam / lam (recall-like).
    Outside supp P, min(lam * 0, Q) = 0, so the sum runs over the support only."""
    log_q, p = _as_arrays(log_q, p)
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if lambdas.ndim != 1 or np.any(lambdas <= 0):
        raise ValueError("lambdas must be a 1-D array of positive numbers")
    alpha = np.minimum(lambdas[:, None] * p[None, :], np.exp(log_q)[None, :]).sum(axis=1)
    return alpha, alpha / lambdas


def default_lambdas(num: int = 41) -> np.ndarray:
    """lam = tan(theta) for theta evenly spaced in (0, pi/2): the angular grid of Simon et al. 2019,
    dense around lam = 1 and reaching both ends of the curve."""
    theta = np.linspace(0.0, np.pi / 2, num + 2)[1:-1]
    return np.tan(theta)
