"""The per-token weight rules: ``nll``, ``cdiv`` and ``lambda_pr`` (Verine et al., ICML 2025).

Each weight is computed from the detached token NLL l = -log q in log space (q^(1-alpha) would
overflow for small q), in float64.
"""

from __future__ import annotations

import math

import torch

from recall_dist.losses.base import LossParamError, TokenBatch, WeightRule, register_rule


@register_rule("nll")
class NLL(WeightRule):
    """w = 1: plain negative log-likelihood, the Precision-leaning baseline."""

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return torch.ones_like(batch.nll)

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        return nll  # KL(delta_y || Q) = -log q


@register_rule("cdiv")
class CDiv(WeightRule):
    """c-Div: w = q^(1 - alpha) = exp((alpha - 1) * l).

    The Tsallis alpha-divergence between the one-hot conditional and the model,
    D_alpha(delta_y || Q) = (q^(1-alpha) - 1) / (alpha (alpha - 1)), has gradient
    -(1/alpha) q^(1-alpha) grad log q, i.e. a weighted NLL with weight q^(1-alpha) (the 1/alpha is
    absorbed by the normaliser).  alpha > 1 favours Recall (paper's best: 1.4), alpha = 1 is NLL.
    Over a context with true conditional P, the population minimiser is q proportional to
    P^(1/alpha) on the support of P: it flattens among valid continuations only.

    alpha < 1 is the Precision side: the minimiser P^(1/alpha) is *sharper* than P, and the weight
    q^(1-alpha) down-weights targets the model finds unlikely.  alpha -> 0 approaches DFT (``dft``,
    w = q); the weight is Li et al.'s ``prob_power`` at alpha_p = 1 - alpha (``losses/prob_rules.py``).
    """

    def __init__(self, alpha: float = 1.4):
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise LossParamError("alpha", f"cdiv: alpha must be a finite number > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        # exp of a float64 exponent: finite for l < ~700 / (alpha - 1).
        return torch.exp((self.alpha - 1.0) * batch.nll)

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        if a == 1.0:
            return nll
        return torch.expm1((a - 1.0) * nll) / (a * (a - 1.0))


@register_rule("lambda_pr")
class LambdaPR(WeightRule):
    """lambda-PR: w = q * 1[q < lam].

    The PR-divergence of Verine et al. (NeurIPS 2023), f_lam(u) = max(lam u, 1) - max(lam, 1),
    on the one-hot conditional gives D = max(lam, q) + 1 - q - max(lam, 1), whose gradient is
    -1[q < lam] grad q = 1[q < lam] q grad l.  lam < 1 favours Recall, lam >= 1 Precision.
    Caveat (measured): with one-hot targets it stops pushing once q >= lam, so deterministic
    tokens stay capped near lam; ``nll_mix`` restores a proper component.  Default lam = 0.0968,
    the best of the demo's grid (with ``nll_mix`` 0.5, configs/lambda_pr.yaml): lam 0.3 against the
    one-hot target softened towards the model, beta = 0.75 (docs/lambda_pr_reference.md).
    """

    def __init__(self, lam: float = 0.0968):
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise LossParamError("lam", f"lambda_pr: lam must be a finite number > 0, got {lam!r}")
        self.lam = float(lam)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        q = torch.exp(-batch.nll)
        return torch.where(q < self.lam, q, torch.zeros_like(q))

    def divergence(self, nll: torch.Tensor) -> torch.Tensor:
        q = torch.exp(-nll)
        return torch.clamp(q, min=self.lam) + 1.0 - q - max(self.lam, 1.0)
