"""Weight rules against their closed forms; registry and validation errors."""

import math

import pytest
import torch

from recall_dist import WeightRule, build_loss, known_rules, register_rule
from recall_dist.losses import TokenBatch


def batch(values):
    return TokenBatch(torch.tensor(values, dtype=torch.float64), None, None)


def test_registry_lists_all_rules():
    assert {"nll", "cdiv", "lambda_pr", "truncr", "truncp"} <= set(known_rules())


@pytest.mark.parametrize("alpha", [0.7, 1.0, 1.4, 2.0])
def test_cdiv_weight_is_q_pow_one_minus_alpha(alpha):
    nll = [0.01, 0.5, 2.0, 7.0]
    w = build_loss("cdiv", alpha=alpha).clipped_weights(batch(nll))
    expected = [math.exp(-x) ** (1 - alpha) for x in nll]
    assert torch.allclose(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.7, 1.4, 2.0])
def test_cdiv_gradient_matches_tsallis_divergence(alpha):
    """d/dz D_alpha(delta_y || softmax z) = (1/alpha) q^(1-alpha) d/dz (-log q): weight and direction."""
    z = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y = 4
    q = torch.softmax(z, 0)[y]
    d = (q ** (1 - alpha) - 1) / (alpha * (alpha - 1))
    (g_div,) = torch.autograd.grad(d, z)
    nll = -torch.log_softmax(z, 0)[y]
    (g_nll,) = torch.autograd.grad(nll, z)
    rule = build_loss("cdiv", alpha=alpha).rule
    w = rule.weights(batch([float(nll)]))[0]
    assert torch.allclose(g_div, w * g_nll / alpha, rtol=1e-10)
    assert torch.allclose(rule.divergence(torch.tensor([float(nll)], dtype=torch.float64))[0], d.detach())


def test_lambda_pr_weight_and_divergence_gradient():
    lam = 0.3
    for y in range(5):
        z = torch.randn(6, dtype=torch.float64, requires_grad=True)
        q = torch.softmax(z, 0)[y]
        d = torch.clamp(q, min=lam) + 1 - q - max(lam, 1.0)
        (g_div,) = torch.autograd.grad(d, z)
        nll = -torch.log_softmax(z, 0)[y]
        (g_nll,) = torch.autograd.grad(nll, z)
        w = build_loss("lambda_pr", lam=lam).clipped_weights(batch([float(nll)]))[0]
        assert float(w) == pytest.approx(float(q) if float(q) < lam else 0.0)
        assert torch.allclose(g_div, w * g_nll, atol=1e-12)


def test_max_weight_clips_every_rule():
    w = build_loss("cdiv", alpha=2.0, max_weight=3.0).clipped_weights(batch([0.1, 5.0]))
    assert w.tolist() == pytest.approx([math.exp(0.1), 3.0])


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("cdiv", {"alpha": 0}, "alpha"),
        ("cdiv", {"alpha": -1.0}, "alpha"),
        ("cdiv", {"alpha": float("nan")}, "alpha"),
        ("lambda_pr", {"lam": 0}, "lam"),
        ("truncr", {"drop": 1.0}, "drop"),
        ("truncp", {"drop": 0.0}, "drop"),
        ("truncr", {"granularity": "doc"}, "granularity"),
        ("truncr", {"buffer_size": 0}, "buffer_size"),
        ("truncr", {"buffer_size": 8, "min_count": 9}, "min_count"),
        ("truncr", {"recompute_every": 0}, "recompute_every"),
        ("nll", {"nll_mix": 1.5}, "nll_mix"),
        ("nll", {"max_weight": -2}, "max_weight"),
        ("nll", {"normalize": "batch"}, "normalize"),
        ("cdiv", {"beta": 1.0}, "beta"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, needle):
    with pytest.raises(ValueError, match=needle):
        build_loss(name, **params)


def test_unknown_rule_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'cdvi'.*cdiv.*lambda_pr.*nll.*truncp.*truncr"):
        build_loss("cdvi")


def test_user_rule_registers_without_touching_kernels():
    @register_rule("test_square_nll")
    class SquareNLL(WeightRule):
        """w = l: the weighted NLL then follows the gradient of l^2 / 2."""

        def weights(self, b):
            return b.nll.clone()

    from recall_dist import fused_linear_loss

    torch.manual_seed(0)
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 7, (9,))
    out = fused_linear_loss(h, w, y, build_loss("test_square_nll"))
    nll = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="none")
    ref = (nll.detach() * nll).sum() / nll.detach().sum()
    assert torch.allclose(out.loss, ref)
    assert torch.allclose(torch.autograd.grad(out.loss, h)[0], torch.autograd.grad(ref, h)[0])
