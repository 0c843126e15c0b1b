"""The step's weight diagnostics (``losses/diagnostics.py``): the top-1% share of the objective equals a
naive computation over the concatenated tokens of every micro-batch and rank (2 gloo ranks x 2
micro-batches, through the real fused head), and ESS / tokens and max / mean weight equal their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.losses.diagnostics import TopContributions, top_count, weight_diagnostics

B, T, H, V = 12, 30, 10, 40  # 360 targets, some ignored: k = ceil(N / 100) = 4
CASES = [("cdiv", {"alpha": 2.0}), ("cdiv", {"alpha": 1.4, "max_weight": 3.0}), ("nll", {})]


def batch():
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 2.0  # peaked softmax: weights vary
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, T), generator=g)
    target[1, :9] = -100
    target[8, 3:] = -100
    return hidden, weight, target


def naive(name: str, params: dict) -> dict[str, float]:
    """The diagnostics from full logits over all B x T tokens at once, by their definitions."""
    hidden, weight, target = batch()
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1).reshape(-1, V)
    valid = target.reshape(-1) != -100
    nll = -logp[valid].gather(1, target.reshape(-1)[valid].unsqueeze(1)).squeeze(1)
    w = torch.exp((params.get("alpha", 1.0) - 1.0) * nll) if name == "cdiv" else torch.ones_like(nll)
    if "max_weight" in params:
        w = w.clamp(max=params["max_weight"])
    contributions = (w * nll).tolist()
    k = math.ceil(len(contributions) / 100)
    top = sum(sorted(contributions, reverse=True)[:k])
    return {
        "top1pct_share": top / sum(contributions),
        "ess_fraction": float(w.sum() ** 2 / (w * w).sum()) / len(contributions),
        "weight_max_over_mean": float(w.max() / w.mean()),
    }


def _two_ranks_two_micro_batches(results) -> None:
    import torch.distributed as dist

    group, rank = dist.group.WORLD, dist.get_rank()
    hidden, weight, target = batch()
    mine = torch.arange(B)[rank::2]  # each rank its rows, cut into 2 micro-batches
    count = float((target != -100).sum())
    for name, params in CASES:
        loss = build_loss(name, **params)
        with loss.optimizer_step(count) as step:
            for rows in mine.chunk(2):
                fused_linear_loss(hidden[rows], weight, target[rows], loss, dp_group=group, chunk_size=7)
            share = step.top_share(group)
            stats = step.stats()
        expected = naive(name, params)
        assert share == pytest.approx(expected["top1pct_share"], rel=1e-12), (name, params)
        for key in ("ess_fraction", "weight_max_over_mean"):
            assert stats[key] == pytest.approx(expected[key], rel=1e-12), (name, params, key)
    if rank == 0:
        results.put("ok")


def test_top_share_is_exact_over_micro_batches_and_ranks():
    import multiprocessing as mp

    results = mp.get_context("spawn").SimpleQueue()
    run_distributed_test(_two_ranks_two_micro_batches, 2, results)
    assert results.get() == "ok"


def test_the_shares_are_not_trivial():
    """The case is one that would catch a wrong merge: cdiv's top 1% holds far more than 1% of it."""
    assert naive("cdiv", {"alpha": 2.0})["top1pct_share"] > 0.05
    assert naive("nll", {})["top1pct_share"] > 0.01 and naive("nll", {})["ess_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("n,k", [(0, 0), (1, 1), (100, 1), (101, 2), (700, 7), (12345, 124)])
def test_top_count_is_the_ceiling_of_one_percent(n, k):
    assert top_count(float(n)) == k


def test_top_contributions_keep_the_k_largest_of_all_calls():
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(n, generator=g, dtype=torch.float64) for n in (5, 0, 40, 3)]
    top = TopContributions(6)
    for part in parts:
        top.add(part)
    everything = torch.cat(parts)
    assert top.global_share(float(everything.sum()), None) == pytest.approx(
        float(everything.sort(descending=True).values[:6].sum() / everything.sum()), rel=1e-14
    )
    assert TopContributions(6).global_share(0.0, None) == 0.0  # nothing seen, nothing carried


def test_weight_diagnostics_of_an_empty_step_are_zero():
    stats = {"tokens": 0.0, "ess": 0.0, "weight_max": 0.0, "weight_mean": 0.0}
    assert weight_diagnostics(stats) == {"ess_fraction": 0.0, "weight_max_over_mean": 0.0}
