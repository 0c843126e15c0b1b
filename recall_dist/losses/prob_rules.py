"""Probability-based fine-tuning objectives as weight rules: ``dft`` (Wu et al. 2025) and the family
of Li et al. (2025), ``prob_power`` and ``prob_threshold``.

Each objective is a per-token function f(q) of the target probability q = exp(-l), minimised as
mean_n f(q_n).  Its gradient is a weighted NLL with a detached weight:

    grad f(q) = f'(q) grad q = f'(q) q grad log q = -q f'(q) grad l,    so    w = -q f'(q)

(f = -log q gives w = 1, NLL; f = -q gives w = q).  What is equal, exactly:

- ``normalize: tokens`` (Z = N, the global count of valid tokens): the gradient of our loss is the
  gradient of mean_n f(q_n), for f as written in each rule's docstring (constant factors included).
- the default ``normalize: weights`` (Z = sum_n w_n): the gradient is N / Z times that, a positive
  factor per step: every step has the original objective's direction, only its length differs
  (and a constant factor in f, such as k in -q^k, cancels).

Weights come from the detached float64 NLL, in log space.
"""

from __future__ import annotations

import math

import torch

from recall_dist.losses.base import LossParamError, TokenBatch, WeightRule, register_rule


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@register_rule("dft")
class DFT(WeightRule):
    """Dynamic Fine-Tuning: w = q = exp(-l).

    Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
    Rectification" (arXiv 2508.05629).  DFT's loss is mean_n sg(q_n) * (-log q_n); its gradient is
    that of mean_n (-q_n), the objective f(q) = -q, and w = -q f'(q) = q.  With ``normalize: tokens``
    our loss is DFT's loss, value and gradient; by default the gradient is N / sum_n q_n times DFT's.
    ``divergence`` reports 1 - q (f + 1: zero at q = 1).

    Precision side: a target the model finds unlikely gets little push, so the model sharpens what it
    already predicts; over a context with true conditional P, mean_y P(y) (-q_y) is linear in q and
    is minimised by all the mass on P's mode (not a proper objective).  The same weight is cdiv at
    alpha = 0 (outside cdiv's range) and prob_power at alpha = 1.
    """

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return torch.exp(-batch.nll)

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-nll)  # 1 - q, accurate near q = 1


@register_rule("prob_power")
class ProbPower(WeightRule):
    """The general family of Li et al.: f_alpha(q) = (1 - q^alpha) / alpha, w = q^alpha = exp(-alpha l).

    Li, Qiu, Chen, Ji, Tong 2025, "Beyond Log Likelihood: Probability-Based Objectives for Supervised
    Fine-Tuning across the Model Capability Continuum" (arXiv 2510.00526; ``GeneralFamily-alpha`` in
    their code).  f_alpha'(q) = -q^(alpha-1), so w = -q f'(q) = q^alpha.  alpha -> 0 is NLL
    (f -> -log q); alpha = 1 is their -p objective (1 - q, DFT's gradient); alpha = 10 is their -p^10:
    f_10 = (1 - q^10) / 10, whose gradient is that of -q^10 divided by 10.

    alpha > 0 is what the paper calls prior-leaning (Precision side here: low-probability targets are
    down-weighted), alpha < 0 prior-averse (Recall side; q^alpha grows without bound as q -> 0, clip it
    with ``max_weight``).  The weight is c-Div's with alpha_cdiv = 1 - alpha (the Tsallis divergence is
    f_alpha / (1 - alpha)); alpha >= 1 lies beyond cdiv's range alpha_cdiv > 0.  Over a context with
    true conditional P the population minimiser is q proportional to P^(1/(1 - alpha)) for alpha < 1
    (sharper than P for 0 < alpha < 1), and all the mass on P's mode for alpha >= 1 (the objective
    is then linear or convex in q).  ``divergence`` reports f_alpha(q) (-log q at alpha = 0).
    """

    def __init__(self, alpha: float = 1.0):
        if not _is_number(alpha):
            raise LossParamError("alpha", f"prob_power: alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        # exp of a float64 exponent: finite for alpha >= 0; for alpha < 0 while -alpha * l < ~700.
        return torch.exp(-self.alpha * batch.nll)

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:
            return nll
        return -torch.expm1(-self.alpha * nll) / self.alpha


_SIDES = ("top", "bottom")
_OBJECTIVES = ("p", "log_p")


@register_rule("prob_threshold")
class ProbThreshold(WeightRule):
    """Thresholded objectives of Li et al.: f(q) = g(q) * 1[kept], w = -q g'(q) * 1[kept], with

        side "top":    kept = q >= tau  (tokens the model finds unlikely are dropped: prior-leaning)
        side "bottom": kept = q <= tau
        objective "p":     g(q) = 1 - q,   w = q * 1[kept]
        objective "log_p": g(q) = -log q,  w = 1[kept]

    Li et al. 2025 (arXiv 2510.00526): ``OnlyTopP``, ``OnlyBottomP``, ``OnlyTopLogP`` and
    ``OnlyBottomLogP`` in their code, whose threshold is written q there; tau here, since q is the
    model's probability.  They pick tau as a percentile of the base model's target probabilities, so
    it has no default.  The indicator is piecewise constant: away from q = tau, grad f = 1[kept] grad g.

    Normalisation: their code divides by the number K of *kept* tokens (the threshold enters the loss
    mask).  With objective "log_p" and the default Z = sum_n w_n = K, our loss equals theirs exactly,
    value and gradient; with "p" the gradient is K / sum_kept q times theirs (default) or K / N
    (``normalize: tokens``).  ``lambda_pr`` is side "bottom", objective "p" with a strict q < lam.
    ``divergence`` reports f(q).
    """

    def __init__(self, tau: float | None = None, objective: str = "p", side: str = "top"):
        if objective not in _OBJECTIVES:
            raise LossParamError("objective", f"prob_threshold: objective must be 'p' or 'log_p', got {objective!r}")
        if side not in _SIDES:
            raise LossParamError("side", f"prob_threshold: side must be 'top' or 'bottom', got {side!r}")
        if tau is None:
            raise LossParamError("tau", "prob_threshold: tau (a probability threshold) is required")
        # The bounds of their code: a top threshold of 1 or a bottom threshold of 0 keeps (almost) nothing.
        ok = _is_number(tau) and (0.0 <= tau < 1.0 if side == "top" else 0.0 < tau <= 1.0)
        if not ok:
            allowed = "0 <= tau < 1" if side == "top" else "0 < tau <= 1"
            raise LossParamError("tau", f"prob_threshold: side {side!r} needs {allowed}, got {tau!r}")
        self.tau = float(tau)
        self.objective = objective
        self.side = side
        # q >= tau  <=>  l <= -log tau: the test in log space (tau = 0 keeps every token).
        self._max_nll = math.inf if self.tau == 0.0 else -math.log(self.tau)

    def _kept(self, nll: torch.Tensor) -> torch.Tensor:
        return nll <= self._max_nll if self.side == "top" else nll >= self._max_nll

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        kept = self._kept(batch.nll).to(torch.float64)
        return kept * torch.exp(-batch.nll) if self.objective == "p" else kept

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        g = -torch.expm1(-nll) if self.objective == "p" else nll
        return torch.where(self._kept(nll), g, torch.zeros_like(g))
