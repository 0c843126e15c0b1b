"""What a user watches to see whether a step's weights concentrate on a few tokens (README, "Metrics").

- ``ess_fraction = ESS / tokens`` with ESS = (sum_n w_n)^2 / sum_n w_n^2: the share of the step's tokens
  the weights effectively train on (1 for NLL, small when a few tokens hold the weight);
- ``weight_max_over_mean = max_n w_n / mean_n w_n``;
- ``top1pct_share``: the share of the rule's objective carried by the top 1% of tokens,

      sum of the k largest w_n l_n  /  sum_n w_n l_n,    k = ceil(0.01 N),

  over every token of the optimizer step (all micro-batches, all data-parallel ranks; N the step's count of
  valid tokens).  With ``nll_mix`` m > 0 it describes the rule's part (1 - m) sum w l / Z of the objective.

The top-1% share is exact without gathering the step's tokens: the k largest of a union are among the union
of each part's k largest.  So each loss call keeps its own k largest w_n l_n (``TopContributions.add``: one
``topk`` on the loss's device, merged with the step's so far; k is known on the host from N, no sync), and
at the end of the step each rank sends its k values once (``global_share``: one all-gather of k float64
numbers per rank) and the k largest of those are summed.
"""

from __future__ import annotations

import torch

from recall_dist.distributed.collectives import all_gather_cat, group_size

TOP_PERCENT = 1


def top_count(token_count: float, percent: int = TOP_PERCENT) -> int:
    """k = ceil(percent / 100 * N) for a step of N valid tokens, in integers (0 for an empty step)."""
    return -(-round(token_count) * percent // 100)


class TopContributions:
    """The k largest per-token contributions w_n l_n this rank has seen in one optimizer step."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # float64, at most k, on the loss's device

    def add(self, contributions: torch.Tensor) -> None:
        """Keep the k largest of ``contributions`` ([n] float64 w_n l_n of one loss call) and those so far."""
        if self.k == 0 or contributions.numel() == 0:
            return
        new = contributions.detach().to(torch.float64).flatten()
        if self.values is not None:
            new = torch.cat([self.values.to(new.device), new])
        self.values = new.topk(min(self.k, new.numel()), sorted=False).values

    def global_share(self, objective_sum: float, group, device: torch.device | None = None) -> float:
        """Collective over ``group`` (None: not distributed): the k largest contributions of every rank's
        step summed, over ``objective_sum`` = sum_n w_n l_n of the whole step (0 when that is 0).
        ``device``: where the group's collectives take tensors (the GPU under NCCL)."""
        if self.k == 0:
            return 0.0
        local = torch.zeros(self.k, dtype=torch.float64, device=device)  # contributions are >= 0: zeros pad
        if self.values is not None:
            local[: self.values.numel()] = self.values.to(local.device)
        if group_size(group) > 1:
            local = all_gather_cat(local, group).topk(self.k, sorted=False).values
        top = float(local.sum())
        return top / objective_sum if objective_sum > 0 else 0.0


def weight_diagnostics(stats: dict[str, float]) -> dict[str, float]:
    """``ess_fraction`` and ``weight_max_over_mean`` from a step's statistics (``ess``, ``tokens``,
    ``weight_max``, ``weight_mean``); 0 for an empty step or all-zero weights."""
    tokens, mean = stats["tokens"], stats["weight_mean"]
    return {
        "ess_fraction": stats["ess"] / tokens if tokens > 0 else 0.0,
        "weight_max_over_mean": stats["weight_max"] / mean if mean > 0 else 0.0,
    }
