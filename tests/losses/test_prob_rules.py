"""The probability-based rules (``dft``, ``prob_power``, ``prob_threshold``) against the objectives
they come from, written naively (plain softmax, f(q), autograd): the gradient of our loss equals the
gradient of the *original* loss times the factor each docstring states, through both kernels, one
process and 2-rank TP / DP layouts.  Plus the Precision-side claims, validation and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from recall_dist import WeightRule, build_loss, fused_linear_loss, register_rule, vocab_parallel_loss
from recall_dist.distributed.testing import run_distributed_test

V, H, N = 11, 6, 40

# (name, params) of the new rules, each with both normalisers.
CASES = [
    ("dft", {}),
    ("prob_power", {"alpha": 0.0}),
    ("prob_power", {"alpha": 0.5}),
    ("prob_power", {"alpha": 1.0}),
    ("prob_power", {"alpha": 10.0}),
    ("prob_power", {"alpha": -0.5}),
    ("prob_threshold", {"tau": 0.3, "objective": "p", "side": "top"}),
    ("prob_threshold", {"tau": 0.3, "objective": "p", "side": "bottom"}),
    ("prob_threshold", {"tau": 0.3, "objective": "log_p", "side": "top"}),
    ("prob_threshold", {"tau": 0.3, "objective": "log_p", "side": "bottom"}),
]
CASES = [(name, {**params, "normalize": norm}) for name, params in CASES for norm in ("weights", "tokens")]


def case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def original_terms(q: torch.Tensor, name: str, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss terms, denominator) of the original objective, as its authors' code writes it:
    the loss is terms.sum() / denominator."""
    if name == "dft":  # Wu et al.: sg(p) * (-log p), mean over tokens
        return -(q.detach() * torch.log(q)), torch.tensor(float(q.numel()), dtype=q.dtype)
    if name == "prob_power":  # Li et al.'s GeneralFamily: (1 - p^alpha) / alpha (-log p at 0)
        a = params["alpha"]
        terms = -torch.log(q) if a == 0 else (1 - q**a) / a
        return terms, torch.tensor(float(q.numel()), dtype=q.dtype)
    # Li et al.'s OnlyTop*/OnlyBottom*: the threshold enters the loss mask, so the denominator is
    # the number of kept tokens.
    tau = params["tau"]
    kept = (q >= tau) if params["side"] == "top" else (q <= tau)
    g = (1 - q) if params["objective"] == "p" else -torch.log(q)
    return g * kept, kept.sum().to(q.dtype)


def naive(logits: torch.Tensor, target: torch.Tensor, name: str, params: dict):
    """The original loss of the global batch and the factor c with grad(ours) = c * grad(original):
    c = D / Z, D the original's denominator, Z ours (sum of w = -q f'(q), or the token count), where
    f'(q) comes from autograd on the original terms, not from the rule."""
    valid = target != -100
    q = torch.softmax(logits[valid].double(), dim=-1).gather(1, target[valid].unsqueeze(1)).squeeze(1)
    terms, denominator = original_terms(q, name, params)
    original = terms.sum() / denominator
    q_leaf = q.detach().requires_grad_()
    (f_prime,) = torch.autograd.grad(original_terms(q_leaf, name, params)[0].sum(), q_leaf)
    w = -q_leaf.detach() * f_prime
    z = w.sum() if params["normalize"] == "weights" else torch.tensor(float(q.numel()), dtype=q.dtype)
    return original, float(denominator / z), q.detach()


def batch(seed: int = 0, rows: int = N, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    # Spread logits so that target probabilities fall on both sides of tau = 0.3.
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2.5
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::7] = -100
    return logits, target


def build(name, params):
    return build_loss(name, **params)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_logits_gradient_is_the_original_objective_gradient_times_its_factor(case):
    name, params = case
    logits, target = batch()
    x = logits.clone().requires_grad_()
    original, factor, q = naive(x, target, name, params)
    (g_original,) = torch.autograd.grad(original, x)
    y = logits.clone().requires_grad_()
    out = vocab_parallel_loss(y, target, build(name, params))
    (g_ours,) = torch.autograd.grad(out.loss, y)
    torch.testing.assert_close(g_ours, factor * g_original, rtol=1e-9, atol=1e-13)
    assert (q > 0.3).any() and (q < 0.3).any() and ((q - 0.3).abs() > 1e-3).all()  # both sides of tau


@pytest.mark.parametrize(
    "case", [c for c in CASES if c[0] != "prob_power" or c[1]["alpha"] in (1.0, 10.0)], ids=case_id
)
def test_fused_head_gradient_is_the_original_objective_gradient_times_its_factor(case):
    name, params = case
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 1.2
    _, target = batch()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    original, factor, _ = naive(h @ w.t(), target, name, params)
    g_original = torch.autograd.grad(original, (h, w))
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_loss(h2, w2, target, build(name, params), chunk_size=7)
    g_ours = torch.autograd.grad(out.loss, (h2, w2))
    for ours, ref in zip(g_ours, g_original, strict=True):
        torch.testing.assert_close(ours, factor * ref, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize(
    "name,params",
    [
        ("dft", {"normalize": "tokens"}),  # DFT's loss: mean of sg(q) * (-log q)
        ("prob_threshold", {"tau": 0.3, "objective": "log_p", "side": "top", "normalize": "weights"}),
        ("prob_threshold", {"tau": 0.3, "objective": "log_p", "side": "bottom", "normalize": "weights"}),
    ],
)
def test_loss_value_where_it_is_the_original_loss(name, params):
    """Where the original loss is itself a weighted NLL (DFT, OnlyTopLogP, OnlyBottomLogP), ours is
    that loss: value too, factor 1."""
    logits, target = batch()
    original, factor, _ = naive(logits, target, name, params)
    out = vocab_parallel_loss(logits.clone().requires_grad_(), target, build(name, params))
    assert factor == pytest.approx(1.0, rel=1e-12)
    assert float(out.loss.detach()) == pytest.approx(float(original), rel=1e-12)


def test_paper_minus_p_pow_10_is_prob_power_10_up_to_one_tenth():
    """Li et al.'s -p^10 written naively: with normalize tokens our gradient is exactly 1/10 of it."""
    logits, target = batch(seed=3)
    x = logits.clone().requires_grad_()
    valid = target != -100
    q = torch.softmax(x[valid], dim=-1).gather(1, target[valid].unsqueeze(1)).squeeze(1)
    (g_paper,) = torch.autograd.grad((-(q**10)).mean(), x)
    y = logits.clone().requires_grad_()
    out = vocab_parallel_loss(y, target, build_loss("prob_power", alpha=10.0, normalize="tokens"))
    (g_ours,) = torch.autograd.grad(out.loss, y)
    torch.testing.assert_close(g_ours, g_paper / 10, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_divergence_is_the_original_per_token_objective(case):
    """The 'divergence' statistic is the mean of f(q) over the valid tokens (DFT: 1 - q)."""
    name, params = case
    logits, target = batch()
    valid = target != -100
    q = torch.softmax(logits[valid], dim=-1).gather(1, target[valid].unsqueeze(1)).squeeze(1)
    if name == "dft":
        f = 1 - q
    elif name == "prob_power":
        a = params["alpha"]
        f = -torch.log(q) if a == 0 else (1 - q**a) / a
    else:
        f = original_terms(q, name, params)[0]
    out = vocab_parallel_loss(logits.clone().requires_grad_(), target, build(name, params))
    assert out.stats["divergence"] == pytest.approx(float(f.mean()), rel=1e-10)


def test_cdiv_below_one_is_prob_power_at_one_minus_alpha():
    nll = torch.tensor([0.01, 0.7, 3.0, 9.0], dtype=torch.float64)
    from recall_dist.losses import TokenBatch

    b = TokenBatch(nll, None)
    for alpha in (0.2, 0.5, 0.8):
        w_cdiv = build_loss("cdiv", alpha=alpha).rule.weights(b)
        w_power = build_loss("prob_power", alpha=1 - alpha).rule.weights(b)
        torch.testing.assert_close(w_cdiv, w_power, rtol=1e-14, atol=0)
        # Tsallis divergence = f_(1 - alpha) / alpha
        d_cdiv = build_loss("cdiv", alpha=alpha).rule.divergence(nll)
        d_power = build_loss("prob_power", alpha=1 - alpha).rule.divergence(nll)
        torch.testing.assert_close(d_cdiv, d_power / alpha, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(build_loss("dft").rule.weights(b), torch.exp(-nll), rtol=0, atol=0)


def _population_gradient(name, params, p, q):
    """Gradient w.r.t. the logits log q of sum_y P(y) f(q_y), through our loss: one context whose
    targets are the outcomes y, each repeated in proportion to P(y)."""
    counts = torch.round(p * 200).long()
    target = torch.repeat_interleave(torch.arange(len(p)), counts)
    z = torch.log(q).expand(len(target), -1).clone().requires_grad_()
    out = vocab_parallel_loss(z, target, build_loss(name, **params))
    return torch.autograd.grad(out.loss, z)[0].sum(0)


def test_precision_side_population_minimisers():
    """cdiv alpha < 1 and prob_power 0 < alpha < 1 are stationary at the sharpened q ~ P^(1/alpha_cdiv),
    and push P itself towards its mode; dft pushes the mode up from anywhere inside the simplex."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    sharpened = p**2 / (p**2).sum()
    for name, params in (("cdiv", {"alpha": 0.5}), ("prob_power", {"alpha": 0.5})):
        g_star = _population_gradient(name, params, p, sharpened)
        torch.testing.assert_close(g_star, torch.zeros_like(g_star), rtol=0, atol=1e-12)
        g_at_p = _population_gradient(name, params, p, p)
        assert g_at_p[0] < -1e-3 and g_at_p[-1] > 1e-3  # descent raises the mode, lowers the rarest
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        q = torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0)
        assert _population_gradient("dft", {}, p, q)[0] < 0  # the mode's logit always goes up


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("prob_power", {"alpha": float("inf")}, "alpha"),
        ("prob_power", {"alpha": "1"}, "alpha"),
        ("prob_power", {"alpha": True}, "alpha"),
        ("prob_threshold", {}, "tau"),
        ("prob_threshold", {"tau": 1.0}, "tau"),
        ("prob_threshold", {"tau": -0.1}, "tau"),
        ("prob_threshold", {"tau": 0.0, "side": "bottom"}, "tau"),
        ("prob_threshold", {"tau": float("nan")}, "tau"),
        ("prob_threshold", {"tau": 0.5, "objective": "q"}, "objective"),
        ("prob_threshold", {"tau": 0.5, "side": "middle"}, "side"),
        ("dft", {"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, needle):
    from recall_dist.losses import LossParamError

    with pytest.raises(LossParamError, match=needle) as info:
        build_loss(name, **params)
    assert info.value.param == needle


def test_threshold_edges_are_allowed():
    assert build_loss("prob_threshold", tau=0.0).rule.tau == 0.0  # top, keeps every token
    assert build_loss("prob_threshold", tau=1.0, side="bottom").rule.tau == 1.0


def test_config_validation_knows_the_new_rules():
    from recall_dist.configtree import ConfigError
    from recall_dist.train.config import LossConfig

    assert LossConfig(name="dft").build().name == "dft"
    assert LossConfig(name="prob_threshold", params={"tau": 0.2, "objective": "log_p"}).build().rule.tau == 0.2
    with pytest.raises(ConfigError, match=r"params\.tau"):
        LossConfig(name="prob_threshold", params={"tau": 2.0})


def test_user_rule_keeps_working_beside_the_new_rules():
    """register_rule is unchanged: a user's rule trains through the kernels like a built-in one, and a
    built-in name cannot be taken over."""

    @register_rule("test_half_dft")
    class HalfDFT(WeightRule):
        """w = q / 2 (DFT's direction)."""

        def weights(self, b):
            return 0.5 * torch.exp(-b.nll)

    logits, target = batch()
    g = [
        torch.autograd.grad(vocab_parallel_loss(x, target, build_loss(n)).loss, x)[0]
        for n, x in (("test_half_dft", logits.clone().requires_grad_()), ("dft", logits.clone().requires_grad_()))
    ]
    torch.testing.assert_close(g[0], g[1], rtol=1e-12, atol=1e-15)  # the 1/2 cancels in Z
    with pytest.raises(ValueError, match="already registered"):
        register_rule("dft")(HalfDFT)


# --- 2 ranks: TP = 2 (vocabulary shards) and DP = 2 (uneven row split) ---------------------------

DIST_CASES = [
    ("dft", {"normalize": "weights"}),
    ("prob_power", {"alpha": 10.0, "normalize": "tokens"}),
    ("prob_threshold", {"tau": 0.3, "objective": "p", "side": "top", "normalize": "weights"}),
    ("prob_threshold", {"tau": 0.3, "objective": "log_p", "side": "top", "normalize": "weights"}),
]


def _check_two_ranks():
    import torch.distributed as dist

    from recall_dist.distributed.collectives import all_reduce_, group_rank
    from recall_dist.distributed.testing import tp_dp_groups

    v_pad, v_real, rows = 12, V, 10
    for tp, dp in ((2, 1), (1, 2)):
        tp_group, dp_group = tp_dp_groups(tp, dp)
        t, d = group_rank(tp_group), group_rank(dp_group)
        row_slice = slice(0, rows) if dp == 1 else (slice(0, 6) if d == 0 else slice(6, rows))  # uneven DP
        cols = slice(t * v_pad // tp, (t + 1) * v_pad // tp)
        g = torch.Generator().manual_seed(5)
        hidden = torch.randn(rows, 4, H, generator=g, dtype=torch.float64)
        weight = torch.randn(v_pad, H, generator=g, dtype=torch.float64) * 1.2
        target = torch.randint(0, v_real, (rows, 4), generator=g)
        target[0, :2] = -100
        for name, params in DIST_CASES:
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            original, factor, _ = naive((h @ w.t())[..., :v_real].reshape(-1, v_real), target.reshape(-1), name, params)
            rgh, rgw = torch.autograd.grad(original, (h, w))
            kw = {"tp_group": tp_group, "dp_group": dp_group, "vocab_size": v_real}
            for entry in ("fused", "logits"):
                hl = hidden[row_slice].clone().requires_grad_()
                wl = weight[cols].clone().requires_grad_()
                if entry == "fused":
                    out = fused_linear_loss(hl, wl, target[row_slice], build(name, params), chunk_size=5, **kw)
                    gh, gw = torch.autograd.grad(out.loss, (hl, wl))
                else:
                    logits = (hl @ wl.t()).detach().requires_grad_()
                    out = vocab_parallel_loss(logits, target[row_slice], build(name, params), **kw)
                    (gl,) = torch.autograd.grad(out.loss, logits)
                    gh, gw = torch.autograd.grad(hl @ wl.t(), (hl, wl), gl)
                where = f"{entry} {name} {params} tp={tp} dp={dp}"
                # rank losses are scaled by dp (DDP averages); hidden is a partial sum over TP shards
                gh = all_reduce_(gh.clone(), "sum", tp_group) / dp
                gw = all_reduce_(gw.clone(), "sum", dp_group) / dp
                torch.testing.assert_close(gh, factor * rgh[row_slice], rtol=1e-8, atol=1e-12, msg=where)
                torch.testing.assert_close(gw, factor * rgw[cols], rtol=1e-8, atol=1e-12, msg=where)
        dist.barrier()


@pytest.mark.slow
def test_two_rank_layouts_follow_the_original_objective():
    run_distributed_test(_check_two_ranks, 2)


def test_factor_reference_is_not_trivial():
    """The factors the tests apply differ from 1 where the docstrings say they do."""
    logits, target = batch()
    assert naive(logits, target, "dft", {"normalize": "weights"})[1] > 1.5  # N / sum q
    assert naive(logits, target, "dft", {"normalize": "tokens"})[1] == 1.0
    k_over_z = naive(
        logits, target, "prob_threshold", {"tau": 0.3, "objective": "p", "side": "top", "normalize": "weights"}
    )[1]
    assert k_over_z > 1.0 and not math.isclose(k_over_z, 1.0)
