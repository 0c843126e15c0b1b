"""Truncation rules: ``truncr`` (train on the hardest samples, Recall) and ``truncp`` (loss
truncation of Kang & Hashimoto 2020, Precision), with a distributed rolling quantile threshold.

Exact semantics.  A *step* is one optimizer step: every loss call inside ``RecallLoss.optimizer_step``
(all micro-batches of a gradient-accumulation step), or a single call made outside one.

1. At the start of step k, tau is fixed for the whole step from the buffer as it stands, i.e. from the
   values of steps < k (**the step's own values do not enter its threshold**): while the buffer holds
   fewer than ``min_count`` values, tau is unset and w = 1 (plain NLL warm-up); otherwise tau is
   recomputed when it is unset or ``recompute_every`` steps have passed since it was last computed:
   truncr: tau = drop-quantile, truncp: tau = (1 - drop)-quantile.
2. Each call: s = per-sample NLL of the local batch: the mean NLL of each sequence's valid tokens
   (``granularity="sequence"``; sequences ordered by id) or each token's NLL (``"token"``);
   truncr: w = 1[s >= tau], truncp: w = 1[s <= tau]; a token takes its sequence's weight.
3. Each call then all-gathers s over the data-parallel ranks (rank order) and pushes it into the ring
   buffer (``RollingQuantileBuffer``), identical on every rank.

Why the threshold comes from earlier steps only: a step's weights then do not depend on how its batch is
split over micro-batches and ranks (the batch iterator hands out a step's examples in the same global
order whatever the split, so the buffer also fills in the same order), and a run resumed on another
number of ranks continues the same trajectory.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from recall_dist.distributed.buffer import RollingQuantileBuffer
from recall_dist.losses.base import LossParamError, TokenBatch, WeightRule, register_rule


def sequence_means(nll: torch.Tensor, sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``nll`` per sequence id (ids sorted ascending) and each token's sequence index."""
    uniq, inverse = torch.unique(sequence_ids, sorted=True, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=nll.dtype, device=nll.device).index_add_(0, inverse, nll)
    counts = torch.bincount(inverse, minlength=uniq.numel()).to(nll.dtype)
    return sums / counts, inverse


class _Truncation(WeightRule):
    per_token = False  # needs every token of a sequence and the gathered buffer before weighting
    keep_high: bool
    # Each rule's own defaults of drop and granularity (None in the signature: this rule's default).
    default_drop: ClassVar[float] = 0.5
    default_granularity: ClassVar[str] = "sequence"

    def __init__(
        self,
        drop: float | None = None,
        granularity: str | None = None,
        buffer_size: int = 1024,
        min_count: int | None = None,
        recompute_every: int = 1,
    ):
        name = type(self).name or type(self).__name__.lower()
        drop = type(self).default_drop if drop is None else drop
        granularity = type(self).default_granularity if granularity is None else granularity
        if not (isinstance(drop, (int, float)) and 0.0 < drop < 1.0):
            raise LossParamError("drop", f"{name}: drop must be a fraction in (0, 1), got {drop!r}")
        if granularity not in ("sequence", "token"):
            raise LossParamError(
                "granularity", f"{name}: granularity must be 'sequence' or 'token', got {granularity!r}"
            )
        if not (isinstance(buffer_size, int) and buffer_size >= 1):
            raise LossParamError("buffer_size", f"{name}: buffer_size must be an integer >= 1, got {buffer_size!r}")
        min_count = min(128, buffer_size) if min_count is None else min_count
        if not (isinstance(min_count, int) and 1 <= min_count <= buffer_size):
            raise LossParamError(
                "min_count",
                f"{name}: min_count must be an integer in [1, buffer_size={buffer_size}], got {min_count!r}",
            )
        if not (isinstance(recompute_every, int) and recompute_every >= 1):
            raise LossParamError(
                "recompute_every", f"{name}: recompute_every must be an integer >= 1, got {recompute_every!r}"
            )
        self.drop = float(drop)
        self.granularity = granularity
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.recompute_every = recompute_every
        self._buffer: RollingQuantileBuffer | None = None
        self._pending_state: dict | None = None
        self.step = 0
        self.tau: float | None = None
        self._tau_step = 0
        self._in_step = False

    def _buffer_for(self, group) -> RollingQuantileBuffer:
        if self._buffer is None:
            self._buffer = RollingQuantileBuffer(self.buffer_size, group)
            if self._pending_state is not None:
                self._buffer.load_state_dict(self._pending_state)
                self._pending_state = None
        elif self._buffer.group is not group:
            self._buffer.group = group
        return self._buffer

    def _per_sample(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.granularity == "token":
            return batch.nll, None
        if batch.sequence_ids is None:
            raise ValueError(
                f"{self.name}(granularity='sequence') needs sequence boundaries: pass a target shaped "
                "[batch, seq] or sequence_ids=..., or use granularity='token'"
            )
        return sequence_means(batch.nll, batch.sequence_ids)

    def begin_step(self) -> None:
        self._in_step = True
        self.step += 1
        # The buffer's group is (re)bound by the next push; a quantile needs no communication.
        buffer = self._buffer_for(self._buffer.group if self._buffer is not None else None)
        if len(buffer) < self.min_count:
            self.tau = None
        elif self.tau is None or self.step - self._tau_step >= self.recompute_every:
            self.tau = buffer.quantile(self.drop if self.keep_high else 1.0 - self.drop)
            self._tau_step = self.step

    def end_step(self) -> None:
        self._in_step = False

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        alone = not self._in_step  # a call outside RecallLoss.optimizer_step is a step of its own
        if alone:
            self.begin_step()
        try:
            s, token_to_sample = self._per_sample(batch)
            if self.tau is None:
                w = torch.ones_like(s)
            else:
                w = (s >= self.tau if self.keep_high else s <= self.tau).to(s.dtype)
            self._buffer_for(batch.dp_group).push(s)
        finally:
            if alone:
                self.end_step()
        return w if token_to_sample is None else w[token_to_sample]

    def extra_stats(self) -> dict[str, float]:
        return {"tau": float("nan") if self.tau is None else self.tau}

    def state_dict(self) -> dict:
        buf = self._buffer.state_dict() if self._buffer is not None else self._pending_state
        return {"buffer": buf, "step": self.step, "tau": self.tau, "tau_step": self._tau_step}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tau, self._tau_step = int(sd["step"]), sd["tau"], int(sd["tau_step"])
        if sd["buffer"] is None:
            self._buffer, self._pending_state = None, None
        elif self._buffer is not None:
            self._buffer.load_state_dict(sd["buffer"])
        else:
            self._pending_state = sd["buffer"]


@register_rule("truncr")
class TruncR(_Truncation):
    """TruncR: w = 1[s >= tau], tau the drop-quantile of recent s; trains on the hardest samples
    (those the model covers least), which pushes towards Recall.  Defaults: token level, drop 0.3,
    the best setting of the demo's grid (README; docs/demo/grid.md)."""

    keep_high = True
    default_drop = 0.3
    default_granularity = "token"


@register_rule("truncp")
class TruncP(_Truncation):
    """TruncP (loss truncation, Kang & Hashimoto 2020): w = 1[s <= tau], tau the (1 - drop)-quantile;
    drops the highest-loss samples, which pushes towards Precision."""

    keep_high = False
