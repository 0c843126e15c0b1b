"""Naive, independent reference of the loss family: full logits, ``F.cross_entropy``, the weight
formulas written directly from the paper (q ** (1 - alpha), q * 1[q < lam], numpy quantiles), and
autograd for the gradients.  Nothing here imports recall_dist's kernels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class NaiveTruncState:
    """History of per-sample values for the truncation reference (what the rolling buffer holds)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.history: list[float] = []

    def push(self, values: list[float]) -> None:
        self.history = (self.history + list(values))[-self.capacity :]


def naive_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    name: str,
    params: dict,
    *,
    vocab_size: int | None = None,
    seq_ids: torch.Tensor | None = None,
    state: NaiveTruncState | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Objective of one step on the *global* batch.  ``logits`` [N, V_pad] (differentiable), ``target`` [N]."""
    params = dict(params)
    mix = params.pop("nll_mix", 0.0)
    max_weight = params.pop("max_weight", None)
    normalize = params.pop("normalize", "weights")
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    valid = target != ignore_index
    lv = F.cross_entropy(logits[valid].double(), target[valid], reduction="none")
    q = torch.exp(-lv.detach())
    if name == "nll":
        w = torch.ones_like(lv)
    elif name == "cdiv":
        w = q ** (1.0 - params.get("alpha", 1.4))
    elif name == "lambda_pr":
        w = q * (q < params["lam"]).double()
    elif name in ("truncr", "truncp"):
        drop = params.get("drop", 0.5)
        if params.get("granularity", "sequence") == "token":
            s, owner = lv.detach().numpy(), np.arange(lv.numel())
        else:
            ids = seq_ids[valid].numpy()
            order = sorted(set(ids.tolist()))
            s = np.array([lv.detach().numpy()[ids == i].mean() for i in order])
            owner = np.array([order.index(i) for i in ids])
        # The threshold comes from earlier steps only; this step's values enter the history afterwards.
        hist = np.asarray(state.history)
        if len(hist) < params.get("min_count", 1):
            keep = np.ones(len(s), dtype=bool)
        elif name == "truncr":
            keep = s >= np.quantile(hist, drop)
        else:
            keep = s <= np.quantile(hist, 1.0 - drop)
        state.push(s.tolist())
        w = torch.tensor(keep[owner], dtype=torch.float64)
    else:
        raise KeyError(name)
    if max_weight is not None:
        w = torch.clamp(w, max=max_weight)
    z = w.sum() if normalize == "weights" else torch.tensor(float(lv.numel()), dtype=torch.float64)
    rule = (w * lv).sum() / z if z > 0 else (0.0 * lv).sum()
    return (1 - mix) * rule + mix * lv.mean() if mix else rule
