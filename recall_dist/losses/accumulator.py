"""One optimizer step = one weighted NLL, however its batch is split over micro-batches and ranks.

The objective of a step is  L = (1 - m) sum_n w_n l_n / Z + m sum_n l_n / N  over *every* token of the
step (all micro-batches of the gradient accumulation, all data-parallel ranks), with N the step's count of
valid tokens and Z = sum_n w_n (``normalize: weights``) or N (``normalize: tokens``).

N is known before the first forward pass (``step_token_count``: the labels of the step's micro-batches,
counted as the loss counts them and all-reduced; ``recall-dist train`` and the Hugging Face Trainer both use
it), Z only after the last one.  So every micro-batch's gradient is formed with the
provisional scale 1/N, and once the step's forward passes are done the accumulated gradients are
multiplied by ``gradient_scale() = N / Z`` (exactly 1 for ``tokens``), before clipping and the update --
no extra forward pass, and the result equals the single-batch gradient up to rounding.

The global sums of every call (already all-reduced over data-parallel ranks) are added up here, so the
statistics describe the whole step, not an average of micro-batches.

Skipped steps -- the one convention of every integration.  A step is *skipped* when a call had a
non-finite logit (the kernel zeroed that call's gradients on every rank, not those of the step's other
micro-batches) or when no token carries weight in its objective (no valid token, or every weight zero
without an NLL part): its gradient is zero by definition.  A skipped step's gradient scale is ``SKIP = 0.0``,
never a division by zero, and never 1.0: the scale means "accumulated gradients x scale = the step's
gradient", and 0 is the only value for which that holds (1.0 would hand a finite part of a non-finite step
to any integration that forgot a separate flag, which is how the Hugging Face + DeepSpeed path once
updated on one).  ``recall_dist/train/step_scale.py`` applies a scale of 0 as "no update" -- the gradients
dropped, the optimizer not stepped -- on a plain model, FSDP2 and DeepSpeed ZeRO alike.  The same rule
serves a step whose token count is not known in advance (``integrations/normalizer.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from recall_dist.constants import IGNORE_INDEX
from recall_dist.distributed.collectives import all_reduce_, group_size
from recall_dist.losses.diagnostics import TopContributions, top_count, weight_diagnostics

# The order of the per-call global sums the kernels all-reduce (float64).
SUM_NAMES = ("sum_w", "count", "sum_wl", "sum_l", "sum_w2", "kept", "sum_div", "nonfinite")

STAT_NAMES = (
    "loss",
    "nll",
    "weight_mean",
    "weight_max",
    "ess",
    "kept_fraction",
    "tokens",
    "divergence",
    "nonfinite_tokens",
)


SKIP = 0.0  # the gradient scale of a skipped step (module docstring, "Skipped steps")


def rescale_factor(provisional: float, normaliser: float) -> float:
    """The factor that turns gradients formed with the normaliser ``provisional`` into those normalised by
    the step's ``normaliser``: ``provisional / normaliser``, and 1.0 where ``normaliser`` is 0 (the part it
    normalises has a zero gradient then, and any other part keeps its exact scale).  Skipped steps never get
    here: they have the scale ``SKIP``."""
    return provisional / normaliser if normaliser > 0 else 1.0


def inverse_or_zero(x: torch.Tensor) -> torch.Tensor:
    """1 / x, and 0 where x <= 0 (an all-ignored batch, or every weight zero: no division by zero)."""
    return torch.where(x > 0, 1.0 / x.clamp_min(1e-300), torch.zeros_like(x))


def stats_from_sums(sums: torch.Tensor, wmax: torch.Tensor, nll_mix: float, normalize: str) -> torch.Tensor:
    """The ``STAT_NAMES`` values (float64 tensor) of a set of tokens from their global sums."""
    sum_w, count, sum_wl, sum_l, sum_w2, kept, sum_div, nonfinite = sums.unbind()
    z = sum_w if normalize == "weights" else count
    objective = (1.0 - nll_mix) * sum_wl * inverse_or_zero(z) + nll_mix * sum_l * inverse_or_zero(count)
    safe_n = count.clamp_min(1.0)
    mean_nll = sum_l / safe_n
    skipped = nonfinite > 0  # a skipped step never reports a finite-looking loss (no host sync here)
    objective = torch.where(skipped, torch.full_like(objective, float("nan")), objective)
    mean_nll = torch.where(skipped, torch.full_like(mean_nll, float("nan")), mean_nll)
    ess = torch.where(sum_w2 > 0, sum_w * sum_w / sum_w2.clamp_min(1e-300), torch.zeros_like(sum_w))
    return torch.stack(
        [objective, mean_nll, sum_w / safe_n, wmax, ess, kept / safe_n, count, sum_div / safe_n, nonfinite]
    )


class StepAccumulator:
    """The running global sums of one optimizer step (see the module docstring)."""

    def __init__(self, token_count: float, nll_mix: float, normalize: str):
        if not token_count >= 0:
            raise ValueError(f"token_count must be >= 0, got {token_count!r}")
        self.token_count = float(token_count)
        self.nll_mix, self.normalize = nll_mix, normalize
        self.sums: torch.Tensor | None = None
        self.wmax: torch.Tensor | None = None
        self.calls = 0
        self.top = TopContributions(top_count(self.token_count))  # this rank's largest w_n l_n of the step

    def coefficients(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of every call inside the step: gradient of sum_n (A w_n + B) l_n, scale 1/N."""
        inv_n = inverse_or_zero(torch.tensor(self.token_count, dtype=torch.float64, device=like.device))
        return (1.0 - self.nll_mix) * inv_n, self.nll_mix * inv_n

    def record(self, sums: torch.Tensor, wmax: torch.Tensor, contributions: torch.Tensor | None = None) -> None:
        """Add one call's global sums and max weight (and its local per-token w_n l_n, for ``top_share``)."""
        if contributions is not None:
            self.top.add(contributions)
        sums, wmax = sums.detach().to("cpu", torch.float64), wmax.detach().to("cpu", torch.float64)
        self.sums = sums.clone() if self.sums is None else self.sums + sums
        self.wmax = wmax.clone() if self.wmax is None else torch.maximum(self.wmax, wmax)
        self.calls += 1

    def _sum(self, name: str) -> float:
        return 0.0 if self.sums is None else float(self.sums[SUM_NAMES.index(name)])

    @property
    def skipped(self) -> bool:
        """Whether the step is skipped (module docstring): a call had non-finite logits, or no token of the
        step carries weight (no valid token, or a zero sum of weights without an NLL part)."""
        if self._sum("nonfinite") > 0:
            return True
        return self._sum("sum_w") == 0 and (self.nll_mix == 0 or self.token_count == 0)

    def gradient_scale(self) -> float:
        """Multiply the step's accumulated gradients by this (before clipping): N / Z for ``weights``, 1 for
        ``tokens``, ``SKIP`` (0.0) for a skipped step."""
        if self._sum("nonfinite") > 0:  # its calls zeroed their own sums and gradients, not the others'
            return SKIP
        counted = self._sum("count")
        if self.sums is not None and abs(counted - self.token_count) > 0.5:
            raise RuntimeError(
                f"the step's loss calls saw {counted:.0f} valid tokens but the step was opened with "
                f"token_count={self.token_count:.0f}: count the labels exactly as the loss does (shifted, "
                "ignore_index excluded, all micro-batches, all-reduced over data-parallel ranks)"
            )
        if self.skipped:
            return SKIP
        if self.normalize == "tokens":
            return 1.0
        if self.nll_mix > 0 and self.calls > 1:
            raise RuntimeError(
                "nll_mix > 0 with normalize='weights' cannot be rescaled exactly after several micro-batches "
                "(the NLL part is normalised by N, the rule part by Z): use normalize='tokens', or one micro-batch "
                "per optimizer step"
            )
        # Z = 0 with an NLL part (one call): the rule's part of every gradient is already zero, and the NLL
        # part must stay as it is.
        return rescale_factor(self.token_count, self._sum("sum_w"))

    def stats(self) -> dict[str, float]:
        """The step's statistics (``STAT_NAMES``), from the sums of all its calls."""
        if self.sums is None:
            return dict.fromkeys(STAT_NAMES, 0.0)
        values = stats_from_sums(self.sums, self.wmax, self.nll_mix, self.normalize).tolist()
        stats = dict(zip(STAT_NAMES, values, strict=True))
        return stats | weight_diagnostics(stats)

    def top_share(self, dp_group) -> float:
        """Collective over ``dp_group``: the share of sum_n w_n l_n carried by the step's top 1% of tokens,
        exact over every call and rank (``losses/diagnostics.py``); every rank calls it once per step."""
        device = _collective_device(dp_group) if group_size(dp_group) > 1 else None
        return self.top.global_share(self._sum("sum_wl"), dp_group, device)


def step_token_count(
    batches, dp_group, *, ignore_index: int = IGNORE_INDEX, mask_sequence_starts: bool = False
) -> float:
    """N of an optimizer step: the valid targets of its micro-batches ``batches`` (dicts with
    ``labels`` [B, T] aligned with the input ids), counted as the loss head counts them -- shifted
    (``labels[..., 1:]``), ``ignore_index`` excluded -- and summed over every data-parallel rank of
    ``dp_group`` (None: not distributed).  Exact: an integer count, reduced in float64.

    ``mask_sequence_starts=True`` also excludes every target at ``position_ids == 0`` (where a batch
    has ``position_ids``): the first token of a packed sequence, which the Hugging Face integration
    masks inside its loss call (``integrations/hf.py``).  ``recall-dist train`` leaves it False: its
    collate already writes ``ignore_index`` there (``data/loader.py``), and its loss head masks nothing.
    Collective over ``dp_group``: every rank calls it for every step."""
    local = None  # an integer count on the labels' device: one transfer at the end, not one per batch
    for batch in batches:
        labels = batch["labels"]
        if mask_sequence_starts and "position_ids" in batch:
            labels = labels.masked_fill(batch["position_ids"].to(labels.device) == 0, ignore_index)
        n = (labels[..., 1:] != ignore_index).sum()
        local = n if local is None else local + n
    count = torch.zeros((), dtype=torch.float64) if local is None else local.to(torch.float64)
    if group_size(dp_group) > 1:
        count = all_reduce_(count.reshape(1).to(_collective_device(dp_group)), "sum", dp_group)
    return float(count.sum())


def _collective_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
