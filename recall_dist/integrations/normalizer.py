"""Step-level normalisation over gradient-accumulation micro-batches when the step's token count is
not known in advance (Megatron: its schedule fetches each micro-batch inside the step).

The objective's normaliser Z sums over the whole optimizer step (README, "How the losses work").
Where the step's token count N is known before its first forward (``recall-dist train``, Hugging
Face's Trainer), ``RecallLoss.optimizer_step(N)`` does this: scale 1/N per micro-batch, N / Z once
at the end.  Without N, ``StepNormalizer`` takes the first micro-batch's own normaliser as the
step's constant instead; the final rescale makes the result the same.  The rescale's maths and its skip
convention are the accumulator's (``losses/accumulator.py``: ``rescale_factor``, ``SKIP``); applying
it to the model is ``recall_dist/train/step_scale.py``'s.
"""

from __future__ import annotations

import torch

from recall_dist.losses.accumulator import SKIP, rescale_factor
from recall_dist.losses.base import RecallLoss


class StepNormalizer:
    """Exact step-level Z for one ``RecallLoss`` over the micro-batches of an optimizer step.

    For each micro-batch, ``add(loss, stats)`` (a kernel call's ``.loss`` and ``.stats``) returns
    the tensor to backpropagate,

        loss * D_mb / D_0  =  dp * sum_{n local} w_n l_n / D_0,

    where D_mb is the call's DP-global normaliser (sum of weights; the valid-token count under
    ``normalize="tokens"``) and D_0 that of the step's first micro-batch with a non-zero one (so a
    one-micro-batch step backpropagates ``loss`` unchanged).  Once every micro-batch is in,
    gradients averaged over DP ranks and summed over micro-batches, times
    ``grad_scale() = D_0 / D_step``, equal the gradient of  sum_{step} w_n l_n / D_step.

    ``nll_mix > 0`` with ``normalize="weights"`` has two normalisers (Z and the token count); one
    gradient rescale cannot apply both, so it is refused (use ``normalize="tokens"``, where both are
    the token count).  A skipped step -- a micro-batch with non-finite logits
    (``stats["nonfinite_tokens"]``), or no micro-batch with a non-zero normaliser (every label
    ignored, every weight zero) -- has ``grad_scale() == SKIP`` (0.0), the accumulator's convention.
    Truncation thresholds move with every call here (each micro-batch is pushed to the buffer),
    unlike inside ``optimizer_step``.
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

    def reset(self) -> None:
        """Start a step."""
        self.micro_batches = 0
        self._first = 0.0  # D_0
        self._total = 0.0  # D_step
        self._skipped = False

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
        if not d > 0:  # nothing to normalise (or a skipped call): its loss and gradients are zero
            return loss * 0.0
        if self._first == 0.0:
            self._first = d
        self._total += d
        return loss if d == self._first else loss * (d / self._first)

    @property
    def skipped(self) -> bool:
        """The step is skipped: a micro-batch had non-finite logits, or none had a non-zero normaliser."""
        return self._skipped or self._total == 0.0

    def grad_scale(self) -> float:
        """Factor that turns the accumulated gradients into the step objective's gradient (``SKIP`` when
        ``skipped``; apply it with ``recall_dist.train.step_scale.scale_gradients_``)."""
        if self.skipped:
            return SKIP
        return rescale_factor(self._first, self._total)
