"""``RecallLoss.optimizer_step``: a batch cut into micro-batches inside one optimizer step gives the
gradient and statistics of the whole batch in one call (after ``gradient_scale``), for every rule -- the
one-call result is the reference (and is itself checked against the naive formula in test_kernels)."""

from __future__ import annotations

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from recall_dist.losses.accumulator import SKIP, rescale_factor

B, T, H, V = 8, 7, 12, 30
CASES = [
    ("nll", {}),
    ("cdiv", {"alpha": 2.0}),
    ("cdiv", {"alpha": 1.4, "normalize": "tokens"}),
    ("cdiv", {"alpha": 0.6, "max_weight": 3.0}),
    ("lambda_pr", {"lam": 0.2}),
    ("cdiv", {"alpha": 2.0, "nll_mix": 0.3, "normalize": "tokens"}),
    ("truncr", {"drop": 0.4, "granularity": "sequence", "buffer_size": 64, "min_count": 8}),
    ("truncp", {"drop": 0.3, "granularity": "token", "buffer_size": 200, "min_count": 8}),
]


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 2.0  # peaked softmax: weights vary
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, T), generator=g)
    target[1, :4] = -100
    target[6, 2:] = -100
    return hidden, weight, target


def one_step(loss, hidden, weight, target, pieces: int, entry: str):
    """Gradients and step statistics with the batch cut into ``pieces`` micro-batches (rows)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    count = float((target != -100).sum())
    with loss.optimizer_step(count) as step:
        for rows in torch.arange(B).chunk(pieces):
            if entry == "fused":
                out = fused_linear_loss(h[rows], w, target[rows], loss, chunk_size=5)
            else:
                out = vocab_parallel_loss(h[rows] @ w.t(), target[rows], loss, chunk_size=5)
            out.loss.backward()
        scale = step.gradient_scale()
        stats = step.stats() | loss.rule.extra_stats()
    return h.grad * scale, w.grad * scale, stats


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_micro_batches_equal_the_whole_batch(entry, case):
    name, params = case
    whole, split = build_loss(name, **params), build_loss(name, **params)
    for step in range(3):  # several steps: truncation thresholds come from earlier steps
        hidden, weight, target = batch(step)
        ref_h, ref_w, ref_stats = one_step(whole, hidden, weight, target, 1, entry)
        got_h, got_w, got_stats = one_step(split, hidden, weight, target, 4, entry)
        torch.testing.assert_close(got_h, ref_h, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(got_w, ref_w, rtol=1e-10, atol=1e-13)
        for key, value in ref_stats.items():
            assert got_stats[key] == pytest.approx(value, rel=1e-10, nan_ok=True), (step, key)
    if name in ("truncr", "truncp"):
        assert 0 < ref_stats["kept_fraction"] < 1 and ref_stats["tau"] == ref_stats["tau"]
    if name == "cdiv" and params.get("alpha", 1) > 1:
        assert ref_stats["weight_max"] > 3 * ref_stats["weight_mean"]  # the weights do vary


def test_step_equals_a_single_call_outside_a_step():
    """One micro-batch in a step = the plain call (whose normaliser is its own)."""
    hidden, weight, target = batch(5)
    loss = build_loss("cdiv", alpha=2.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_linear_loss(h, w, target, loss).loss.backward()
    got_h, got_w, _ = one_step(build_loss("cdiv", alpha=2.0), hidden, weight, target, 1, "fused")
    torch.testing.assert_close(got_h, h.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_w, w.grad, rtol=1e-12, atol=1e-14)


def test_everything_truncated_keeps_a_zero_gradient_and_the_nll_part():
    """Z = 0 (every weight 0): no division by zero.  Without an NLL part the step is skipped (scale SKIP,
    zero gradient); with one, the scale is 1: the rule's gradient is exactly 0 and the nll_mix part stays
    what it is."""
    hidden, weight, target = batch(0)
    loss = build_loss("lambda_pr", lam=1e-300)  # w = q * 1[q < 1e-300]: every weight 0
    got_h, got_w, stats = one_step(loss, hidden, weight, target, 2, "fused")
    assert stats["weight_mean"] == 0 and torch.count_nonzero(got_h) == 0 and torch.count_nonzero(got_w) == 0
    with loss.optimizer_step(float((target != -100).sum())) as step:
        fused_linear_loss(hidden, weight, target, loss)
        assert step.skipped and step.gradient_scale() == SKIP
    mixed = build_loss("lambda_pr", lam=1e-300, nll_mix=0.5, normalize="tokens")
    got_h, got_w, _ = one_step(mixed, hidden, weight, target, 2, "fused")
    nll_h, nll_w, _ = one_step(build_loss("nll"), hidden, weight, target, 1, "fused")
    torch.testing.assert_close(got_h, 0.5 * nll_h, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got_w, 0.5 * nll_w, rtol=1e-10, atol=1e-13)


def test_nll_mix_with_weights_over_several_micro_batches_is_refused():
    hidden, weight, target = batch(1)
    loss = build_loss("cdiv", alpha=2.0, nll_mix=0.5)
    with pytest.raises(RuntimeError, match="nll_mix > 0 with normalize='weights'"):
        one_step(loss, hidden, weight, target, 2, "fused")
    one_step(build_loss("cdiv", alpha=2.0, nll_mix=0.5), hidden, weight, target, 1, "fused")  # one call: exact


def test_a_wrong_token_count_is_reported():
    hidden, weight, target = batch(2)
    loss = build_loss("nll")
    expected = r"saw \d+ valid tokens but the step was opened with token_count=3"
    with pytest.raises(RuntimeError, match=expected), loss.optimizer_step(3.0) as step:
        fused_linear_loss(hidden, weight, target, loss)
        step.gradient_scale()


def test_steps_do_not_nest():
    loss = build_loss("nll")
    with loss.optimizer_step(1.0), pytest.raises(RuntimeError, match="do not nest"), loss.optimizer_step(1.0):
        pass
    assert not loss.in_step


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_a_step_without_a_valid_token_is_skipped(case):
    """Every label ignored (N = 0, Z = 0): the step is skipped -- scale SKIP, zero gradients, finite
    statistics (loss 0), no division by zero -- for every rule, over several micro-batches."""
    hidden, weight, target = batch(3)
    target = torch.full_like(target, -100)
    got_h, got_w, stats = one_step(build_loss(case[0], **case[1]), hidden, weight, target, 4, "fused")
    assert torch.count_nonzero(got_h) == 0 and torch.count_nonzero(got_w) == 0
    assert stats["loss"] == 0.0 and stats["tokens"] == 0.0 and stats["nonfinite_tokens"] == 0.0, stats
    assert all(v == v for k, v in stats.items() if k != "tau"), stats  # no NaN (tau: none before min_count)
    loss = build_loss(case[0], **case[1])
    with loss.optimizer_step(0.0) as step:
        for rows in torch.arange(B).chunk(4):
            fused_linear_loss(hidden[rows], weight, target[rows], loss)
        assert step.skipped and step.gradient_scale() == SKIP == 0.0


def test_a_non_finite_micro_batch_skips_the_whole_step():
    """One micro-batch with a non-finite logit zeroes its own gradients only; the step's scale is SKIP
    (0.0), so the finite micro-batches' gradients never reach an update (it was 1.0)."""
    hidden, weight, target = batch(4)
    hidden = hidden.clone()
    hidden[B - 1, 0, 0] = float("nan")
    loss = build_loss("cdiv", alpha=2.0)
    h = hidden.clone().requires_grad_()
    with loss.optimizer_step(float((target != -100).sum())) as step:
        for rows in torch.arange(B).chunk(2):
            fused_linear_loss(h[rows], weight, target[rows], loss).loss.backward()
        assert torch.count_nonzero(h.grad[: B // 2]) > 0  # the finite half did form a gradient
        assert step.skipped and step.gradient_scale() == SKIP
        assert step.stats()["nonfinite_tokens"] > 0


def test_rescale_factor_never_divides_by_zero():
    assert rescale_factor(6.0, 4.0) == 1.5 and rescale_factor(6.0, 0.0) == 1.0
