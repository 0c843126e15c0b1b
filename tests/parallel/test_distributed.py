"""Real multi-process (gloo) runs: every TP x DP layout gives the single-process global objective
and its gradients (logits, hidden, weight), with uneven DP splits and a padded vocabulary."""

import pytest
import torch
import torch.distributed as dist

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from recall_dist.distributed.collectives import CommCounter, all_reduce_, group_rank, group_size
from recall_dist.distributed.testing import run_distributed_test, tp_dp_groups
from tests.parallel.cases import RULE_CASES
from tests.reference import NaiveTruncState, naive_loss

T, H, V_REAL = 6, 12, 45


def global_batch(step, rows, v_pad):
    g = torch.Generator().manual_seed(1000 + step)
    hidden = torch.randn(rows, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(v_pad, H, generator=g, dtype=torch.float64) * 0.6
    target = torch.randint(0, V_REAL, (rows, T), generator=g)
    target[0, :2] = -100
    target[-1, 3:] = -100
    return hidden, weight, target


def reference(hidden, weight, target, name, params, state):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    seq = torch.arange(target.shape[0]).unsqueeze(1).expand_as(target).reshape(-1)
    ref = naive_loss(
        (h @ w.t()).reshape(-1, w.shape[0]),
        target.reshape(-1),
        name,
        params,
        vocab_size=V_REAL,
        seq_ids=seq,
        state=state,
    )
    gh, gw = torch.autograd.grad(ref, (h, w))
    return ref.detach(), gh, gw


def check_layout(tp, dp, split, v_pad, steps=2):
    tp_group, dp_group = tp_dp_groups(tp, dp)
    t, d = group_rank(tp_group), group_rank(dp_group)
    assert group_size(tp_group) == tp and group_size(dp_group) == dp
    rows = slice(sum(split[:d]), sum(split[: d + 1]))
    local_vocab = v_pad // tp
    cols = slice(t * local_vocab, (t + 1) * local_vocab)
    for entry in ("fused", "logits"):
        for name, params in RULE_CASES:
            loss = build_loss(name, **params)
            state = NaiveTruncState(params.get("buffer_size", 10**6))
            for step in range(steps):
                hidden, weight, target = global_batch(step, sum(split), v_pad)
                ref, rgh, rgw = reference(hidden, weight, target, name, params, state)
                h = hidden[rows].clone().requires_grad_()
                w = weight[cols].clone().requires_grad_()
                kw = {"tp_group": tp_group, "dp_group": dp_group, "vocab_size": V_REAL, "chunk_size": 5}
                if entry == "fused":
                    out = fused_linear_loss(h, w, target[rows], loss, **kw)
                    gh, gw = torch.autograd.grad(out.loss, (h, w))
                else:
                    logits = (h @ w.t()).detach().requires_grad_()
                    out = vocab_parallel_loss(logits, target[rows], loss, **kw)
                    (glogits,) = torch.autograd.grad(out.loss, logits)
                    gh, gw = torch.autograd.grad(h @ w.t(), (h, w), glogits)
                where = f"{entry} {name} {params} step {step} tp={tp} dp={dp}"
                assert out.stats["loss"] == pytest.approx(float(ref), rel=1e-10, abs=1e-12), where
                mean_loss = all_reduce_(out.loss.detach().clone(), "sum", dp_group) / dp
                assert torch.allclose(mean_loss, ref, rtol=1e-10, atol=1e-12), where
                # hidden: partial over the vocab shards (sum over TP); rank losses are scaled by dp
                gh = all_reduce_(gh.clone(), "sum", tp_group) / dp
                assert torch.allclose(gh, rgh[rows], rtol=1e-8, atol=1e-12), where
                # weight: DDP-style mean over DP ranks equals the global gradient of this shard
                gw = all_reduce_(gw.clone(), "sum", dp_group) / dp
                assert torch.allclose(gw, rgw[cols], rtol=1e-8, atol=1e-12), where


def _world2():
    check_layout(tp=2, dp=1, split=[5], v_pad=48)  # TP=2 with 3 padded columns
    dist.barrier()
    check_layout(tp=1, dp=2, split=[3, 2], v_pad=45)  # uneven DP split
    _communication_does_not_grow_with_vocab()


def _world3():
    check_layout(tp=3, dp=1, split=[4], v_pad=48, steps=1)  # 16 columns a shard, last shard padded
    check_layout(tp=1, dp=3, split=[2, 1, 2], v_pad=45, steps=1)


def _world4():
    check_layout(tp=4, dp=1, split=[5], v_pad=48, steps=1)
    check_layout(tp=2, dp=2, split=[3, 2], v_pad=46)  # TP x DP, uneven DP, 1 padded column


def _communication_does_not_grow_with_vocab():
    tp_group, _ = tp_dp_groups(2, 1)
    measured = {}
    for vocab in (64, 4096):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(40, 8, generator=g)
        w = torch.randn(vocab, 8, generator=g)[group_rank(tp_group) * vocab // 2 :][: vocab // 2]
        y = torch.randint(0, vocab, (40,), generator=g)
        for name, entry in (("cdiv", "fused"), ("truncr", "fused"), ("cdiv", "logits")):
            loss = build_loss(name, **({"granularity": "token"} if name == "truncr" else {}))
            with CommCounter() as c:
                if entry == "fused":
                    out = fused_linear_loss(
                        h.clone().requires_grad_(), w.clone().requires_grad_(), y, loss, tp_group=tp_group, chunk_size=8
                    )
                else:
                    out = vocab_parallel_loss((h @ w.t()).requires_grad_(), y, loss, tp_group=tp_group)
                out.loss.backward()
            measured[(vocab, name, entry)] = (c.bytes[tp_group], c.calls[tp_group])
    for name, entry in (("cdiv", "fused"), ("truncr", "fused"), ("cdiv", "logits")):
        small, large = measured[(64, name, entry)], measured[(4096, name, entry)]
        assert small == large, (name, entry, small, large)
        assert small[0] <= 40 * 3 * 4  # max + (sum-exp, target logit) in fp32 per token
    # the logits entry point packs everything into 2 collectives for the whole batch
    assert measured[(64, "cdiv", "logits")][1] == 2


@pytest.mark.slow
@pytest.mark.parametrize("world,fn", [(2, _world2), (3, _world3), (4, _world4)], ids=["w2", "w3", "w4"])
def test_layouts_match_single_process(world, fn):
    run_distributed_test(fn, world)
