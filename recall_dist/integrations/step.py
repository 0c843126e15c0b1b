"""Step-level normalisation over gradient-accumulation micro-batches, for trainers we do not own.

The objective's normaliser Z is the sum over the whole optimizer step (README, "How the losses
work"): every micro-batch on every data-parallel rank.  A micro-batch's weights, hence Z, are known
only after its forward, so no loss value formed per micro-batch can be divided by the step's Z.
What is exact instead: backpropagate each micro-batch's *unnormalised* weighted sum (times a
constant of the step), record its normaliser, and rescale the accumulated gradients once, after the
last micro-batch and before clipping and the optimizer step.  Megatron's per-token loss mode does
the same with an integer token count; ours is a float (a sum of weights).

``StepNormalizer`` holds that bookkeeping; the Megatron and Hugging Face integrations apply the
rescale where their trainers allow it.
"""

from __future__ import annotations

import math

import torch

from recall_dist.losses.base import RecallLoss


class StepNormalizer:
    """Exact step-level Z for one ``RecallLoss`` over the micro-batches of an optimizer step.

    For each micro-batch, ``add(loss, stats)`` (a kernel call's ``.loss`` and ``.stats``) returns
    the tensor to backpropagate,

        loss * D_mb / D_0  =  dp * sum_{n local} w_n l_n / D_0,

    where D_mb is the call's DP-global normaliser (sum of weights; the valid-token count under
    ``normalize="tokens"``) and D_0 a constant of the step: the ``provisional`` value given to
    ``reset`` (e.g. the step's token count, known before its first forward), else the first
    micro-batch's own D (so a one-micro-batch step backpropagates ``loss`` unchanged).  Once every
    micro-batch is in, gradients averaged over DP ranks and summed over micro-batches, times
    ``grad_scale() = D_0 / D_step``, equal the gradient of  sum_{step} w_n l_n / D_step;
    ``objective()`` is that loss's value.

    ``nll_mix > 0`` with ``normalize="weights"`` has two normalisers (Z and the token count); one
    gradient rescale cannot apply both, so it is refused (use ``normalize="tokens"``, where both are
    the token count).  A micro-batch with non-finite logits skips the whole step: ``grad_scale()``
    is 0 and ``objective()`` NaN, as a single call skips (``stats["nonfinite_tokens"]``).
    """

    def __init__(self, loss: RecallLoss):
        if loss.nll_mix > 0 and loss.normalize == "weights":
            raise ValueError(
                f"nll_mix={loss.nll_mix} with normalize='weights' cannot be normalised over an accumulated "
                "step (two normalisers: the sum of weights and the token count); use normalize='tokens' "
                "or one micro-batch per optimizer step"
            )
        self.loss = loss
        self.reset()

    def reset(self, provisional: float | None = None) -> None:
        """Start a step; ``provisional`` (> 0, the same on every rank) fixes D_0 in advance."""
        self.micro_batches = 0
        self._first = float(provisional) if provisional is not None and provisional > 0 else 0.0
        self._total = 0.0  # D_step
        self._sums = dict.fromkeys(("objective", "nll", "weight_mean", "kept_fraction", "tokens"), 0.0)
        self._skipped = False
        self._extra: dict[str, float] = {}

    def normaliser(self, stats: dict[str, float]) -> float:
        """D of one call from its (DP-global) statistics: sum of weights or token count."""
        if self.loss.normalize == "tokens":
            return stats["tokens"]
        return stats["weight_mean"] * stats["tokens"]

    def add(self, loss: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
        """Record one micro-batch; returns the tensor to backpropagate (see the class docstring)."""
        d = self.normaliser(stats)
        self.micro_batches += 1
        self._skipped |= stats["nonfinite_tokens"] > 0
        tokens = stats["tokens"]
        for key in ("nll", "weight_mean", "kept_fraction"):  # token-weighted means over the step
            self._sums[key] += stats[key] * tokens
        self._sums["tokens"] += tokens
        self._extra = {k: v for k, v in stats.items() if k == "tau"}
        if d <= 0:  # nothing to normalise: the call's loss and gradients are zero
            return loss * 0.0
        if self._first == 0.0:
            self._first = d
        self._total += d
        self._sums["objective"] += stats["loss"] * d
        return loss if d == self._first else loss * (d / self._first)

    @property
    def skipped(self) -> bool:
        """A micro-batch of this step had non-finite logits."""
        return self._skipped

    def grad_scale(self) -> float:
        """Factor that turns the accumulated gradients into the step objective's gradient."""
        if self._skipped:
            return 0.0
        return self._first / self._total if self._total > 0 else 1.0

    def objective(self) -> float:
        """The step's loss value, sum_{step} w_n l_n / D_step (NaN when the step was skipped)."""
        if self._skipped:
            return math.nan
        return self._sums["objective"] / self._total if self._total > 0 else 0.0

    def stats(self) -> dict[str, float]:
        """The step's statistics: the objective, token-weighted means, the token count, ``tau``."""
        n = max(self._sums["tokens"], 1.0)
        means = {k: self._sums[k] / n for k in ("nll", "weight_mean", "kept_fraction")}
        return {"loss": self.objective(), **means, "tokens": self._sums["tokens"], **self._extra}


def scale_gradients_(modules, factor: float) -> None:
    """Multiply the accumulated gradients of ``modules`` by ``factor`` in place (``.main_grad``
    where Megatron's DDP keeps them, else ``.grad``; DTensor gradients scale shard by shard)."""
    if factor == 1.0:
        return
    for module in modules:
        if hasattr(module, "scale_gradients"):  # Megatron DDP: one call scales its grad buffers
            module.scale_gradients(factor)
            continue
        for p in module.parameters():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is not None:
                grad.mul_(factor)
