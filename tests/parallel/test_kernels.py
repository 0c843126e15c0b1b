"""Both entry points, single process, against the naive reference (value and gradients)."""

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from tests.parallel.cases import RULE_CASES, case_id
from tests.reference import NaiveTruncState, naive_loss

B, T, H, V = 4, 9, 16, 40


def make(dtype, seed=0, vocab_pad=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V + vocab_pad, H, generator=g, dtype=torch.float64) * 0.7
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, :3] = -100
    target[2, 5:] = -100
    return hidden.to(dtype), weight.to(dtype), target


def reference(hidden, weight, target, name, params, steps_state=None, vocab_size=None):
    h = hidden.double().detach().requires_grad_()
    w = weight.double().detach().requires_grad_()
    seq = torch.arange(B).unsqueeze(1).expand(B, T).reshape(-1)
    state = steps_state or NaiveTruncState(params.get("buffer_size", 10**6))
    ref = naive_loss(
        (h @ w.t()).reshape(-1, w.shape[0]),
        target.reshape(-1),
        name,
        params,
        vocab_size=vocab_size,
        seq_ids=seq,
        state=state,
    )
    gh, gw = torch.autograd.grad(ref, (h, w))
    return ref.detach(), gh, gw


def ours(entry, hidden, weight, target, loss, **kw):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if entry == "fused":
        out = fused_linear_loss(h, w, target, loss, chunk_size=7, **kw)
    else:
        logits = h @ w.t()
        out = vocab_parallel_loss(logits, target, loss, chunk_size=7, **kw)
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    return out, gh, gw


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_matches_naive_fp64(entry, case):
    name, params = case
    loss, state = build_loss(name, **params), NaiveTruncState(params.get("buffer_size", 10**6))
    if name in ("truncr", "truncp"):  # a first step fills the buffer: the second one truncates
        reference(*make(torch.float64, seed=1), name, params, steps_state=state)
        ours(entry, *make(torch.float64, seed=1), loss)
    hidden, weight, target = make(torch.float64)
    ref, rgh, rgw = reference(hidden, weight, target, name, params, steps_state=state)
    out, gh, gw = ours(entry, hidden, weight, target, loss)
    if name in ("truncr", "truncp"):
        assert 0 < out.stats["kept_fraction"] < 1  # the threshold did bite
    assert torch.allclose(out.loss.double(), ref, rtol=1e-10, atol=1e-12)
    assert out.stats["loss"] == pytest.approx(float(ref), rel=1e-10)
    assert torch.allclose(gh, rgh, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gw, rgw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", RULE_CASES[:4] + RULE_CASES[6:7], ids=case_id)
def test_low_precision_inputs(entry, dtype, case):
    name, params = case
    hidden, weight, target = make(dtype)
    ref, rgh, rgw = reference(hidden, weight, target, name, params)  # fp64 on the rounded inputs
    out, gh, gw = ours(entry, hidden, weight, target, build_loss(name, **params))
    assert gh.dtype == dtype and gw.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=tol)
    scale_h, scale_w = rgh.abs().max(), rgw.abs().max()
    assert (gh.double() - rgh).abs().max() <= tol * 2 * scale_h
    assert (gw.double() - rgw).abs().max() <= tol * 2 * scale_w


@pytest.mark.parametrize("entry", ["fused", "logits"])
def test_truncation_over_steps_and_state_round_trip(entry):
    params = {"drop": 0.5, "granularity": "sequence", "buffer_size": 10, "min_count": 6, "recompute_every": 1}
    loss = build_loss("truncr", **params)
    state = NaiveTruncState(10)
    for step in range(4):
        hidden, weight, target = make(torch.float64, seed=step)
        ref, rgh, _ = reference(hidden, weight, target, "truncr", params, steps_state=state)
        if step == 2:  # a resumed loss continues the same trajectory
            fresh = build_loss("truncr", **params)
            fresh.load_state_dict(loss.state_dict())
            loss = fresh
        out, gh, _ = ours(entry, hidden, weight, target, loss)
        assert torch.allclose(out.loss.double(), ref, rtol=1e-10)
        assert torch.allclose(gh, rgh, rtol=1e-9, atol=1e-12)
        # B=4 sequences a step, min_count 6: the buffer holds 8 values when step 2 starts
        assert (out.stats["tau"] == out.stats["tau"]) == (step >= 2)


def test_truncr_keeps_exactly_the_intended_fraction():
    torch.manual_seed(0)
    n, drop = 400, 0.3
    loss = build_loss("truncr", drop=drop, granularity="token", buffer_size=n, min_count=n)
    h, w, target = torch.randn(n, 8), torch.randn(30, 8), torch.randint(0, 30, (n,))
    # The first step fills the buffer (and keeps everything); the same tokens again: exactly 1 - drop.
    assert fused_linear_loss(h, w, target, loss).stats["kept_fraction"] == 1.0
    assert fused_linear_loss(h, w, target, loss).stats["kept_fraction"] == pytest.approx(1 - drop)
    loss_p = build_loss("truncp", drop=drop, granularity="token", buffer_size=n, min_count=n)
    vocab_parallel_loss(h @ w.t(), target, loss_p)
    assert vocab_parallel_loss(h @ w.t(), target, loss_p).stats["kept_fraction"] == pytest.approx(1 - drop)


@pytest.mark.parametrize("entry", ["fused", "logits"])
def test_padded_vocabulary_is_masked(entry):
    hidden, weight, target = make(torch.float64, vocab_pad=5)
    weight[V:] = 50.0  # padded rows would dominate the softmax if they were not masked
    ref, rgh, rgw = reference(hidden, weight, target, "cdiv", {"alpha": 1.4}, vocab_size=V)
    out, gh, gw = ours(entry, hidden, weight, target, build_loss("cdiv"), vocab_size=V)
    assert torch.allclose(out.loss.double(), ref, rtol=1e-10)
    assert torch.allclose(gh, rgh, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gw[:V], rgw[:V], rtol=1e-9, atol=1e-12) and gw[V:].abs().max() == 0


@pytest.mark.parametrize("entry", ["fused", "logits"])
def test_target_outside_vocabulary_names_the_id(entry):
    hidden, weight, target = make(torch.float32)
    target[1, 2] = V + 3
    with pytest.raises(ValueError, match=f"target id {V + 3} at position {T + 2}"):
        ours(entry, hidden, weight, target, build_loss("nll"))
    target[1, 2] = V - 1  # inside the padded shard, outside the real vocabulary
    with pytest.raises(ValueError, match=f"target id {V - 1}"):
        ours(entry, hidden, weight, target, build_loss("nll"), vocab_size=V - 1)


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("name", ["nll", "cdiv", "truncr"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(entry, name):
    hidden, weight, target = make(torch.float32)
    target[:] = -100
    loss = build_loss(name, **({"min_count": 1} if name == "truncr" else {}))
    out, gh, gw = ours(entry, hidden, weight, target, loss)
    assert float(out.loss) == 0.0 and out.stats["tokens"] == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0
    assert all(v == v for k, v in out.stats.items() if k != "tau")  # no NaN


@pytest.mark.parametrize("name", ["cdiv", "truncr"])
def test_non_finite_logits_skip_the_step(name):
    hidden, weight, target = make(torch.float32)
    hidden[1, 3] = float("nan")  # -> a whole row of NaN logits
    loss = lambda: build_loss(name, **({"min_count": 1} if name == "truncr" else {}))  # noqa: E731
    out, gh, gw = ours("fused", hidden, weight, target, loss())
    assert out.stats["nonfinite_tokens"] == 1 and float(out.loss.detach()) == 0.0
    assert torch.isfinite(gh).all() and gh.abs().max() == 0 and gw.abs().max() == 0
    logits = (make(torch.float32)[0] @ weight.t()).requires_grad_()
    with torch.no_grad():
        logits[2, 1, 5] = float("inf")
    out = vocab_parallel_loss(logits, target, loss())
    out.loss.backward()
    assert out.stats["nonfinite_tokens"] == 1 and float(out.loss.detach()) == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_shape_and_weight_errors():
    hidden, weight, target = make(torch.float32)
    with pytest.raises(ValueError, match="does not match target shape"):
        fused_linear_loss(hidden, weight, target[:, :-1], build_loss("nll"))
    with pytest.raises(ValueError, match="ZeRO-3"):
        fused_linear_loss(hidden, weight.new_empty(0), target, build_loss("nll"))
    with pytest.raises(ValueError, match="granularity='token'"):
        sequence_level = build_loss("truncr", granularity="sequence")
        fused_linear_loss(hidden.reshape(-1, H), weight, target.reshape(-1), sequence_level)


def test_gradient_accumulation_scale_and_no_grad():
    hidden, weight, target = make(torch.float64)
    h = hidden.clone().requires_grad_()
    out = fused_linear_loss(h, weight, target, build_loss("cdiv"))
    (0.25 * out.loss).backward()
    ref, rgh, _ = reference(hidden, weight, target, "cdiv", {"alpha": 1.4})
    assert torch.allclose(h.grad, 0.25 * rgh, rtol=1e-9)
    with torch.no_grad():
        assert float(fused_linear_loss(hidden, weight, target, build_loss("cdiv")).loss) == pytest.approx(float(ref))
