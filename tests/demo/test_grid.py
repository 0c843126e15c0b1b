"""The TruncR / lambda-PR grid's report on hand-made curves, and the derivation behind its claim that
a lambda-PR against a reference softened towards the model is lambda-PR at a smaller lam
(docs/lambda_pr_reference.md), checked with autograd."""

from __future__ import annotations

import pytest
import torch

from recall_dist.demo import grid as demo_grid


def test_grid_best_of_each_family():
    nll = [(0.5, 0.999, 0.50), (1.0, 0.99, 0.60), (2.0, 0.90, 0.55)]

    def shifted(d):
        return [(t, p, r + d) for t, p, r in nll]

    curves = {"nll": nll, "truncr-seq-0.5": shifted(-0.05), "truncr-tok-0.1": shifted(-0.01)}
    curves |= {"lambda_pr-0.5-mix0": shifted(-0.2), "lambda_pr-0.95-mix0.9": shifted(0.03)}
    curves["lambda_pr-0.8-mix0.9"] = [(0.5, 0.999, 0.53), (1.0, 0.99, 0.629), (2.0, 0.9, 0.6)]  # a tie at 0.99
    assert demo_grid.best_of(curves, "truncr") == "truncr-tok-0.1"
    assert demo_grid.best_of(curves, "lambda_pr") == "lambda_pr-0.95-mix0.9"  # better at 0.995 than the tie
    text = demo_grid.grid_markdown(curves)
    assert "no setting gains: the best is still -0.010 below NLL" in text
    assert "gains +0.030 over NLL at P >= 0.99" in text
    assert "previous default" not in text  # the comparison with an unreleased version's defaults is gone
    rows = {r["model"]: r for r in demo_grid.grid_rows(curves)}
    assert rows["truncr-tok-0.1"]["margin_at_p0.99"] == pytest.approx(-0.01)
    assert rows["nll"]["verdict"] == "reference"


@pytest.mark.parametrize("lam, beta", [(0.5, 0.5), (0.95, 0.5), (0.8, 0.2), (0.3, 0.9)])
def test_mixed_reference_is_lambda_pr_at_a_smaller_lam(lam, beta):
    """grad of D_lam((1 - beta) delta_y + beta sg(Q) || Q) == grad of -1[q < lam'] q, with
    lam' = lam (1 - beta) / (1 - lam beta), for target probabilities on both sides of lam' and lam."""
    lam_prime = demo_grid.softened_lam(lam, beta)
    assert lam_prime == pytest.approx(lam * (1 - beta) / (1 - lam * beta)) and lam_prime <= lam
    torch.manual_seed(0)
    base = torch.randn(12, dtype=torch.float64)
    checked = set()
    for boost in torch.linspace(-3.0, 8.0, 60, dtype=torch.float64):
        z = base.clone()
        z[3] += boost
        z.requires_grad_(True)
        q = torch.softmax(z, dim=0)
        reference = beta * q.detach()
        reference[3] += 1 - beta
        divergence = torch.maximum(lam * reference, q).sum() - max(lam, 1.0)
        (grad_d,) = torch.autograd.grad(divergence, z)
        z2 = z.detach().clone().requires_grad_(True)
        q_y = torch.softmax(z2, dim=0)[3]
        keep = float(q_y.detach() < lam_prime)
        (grad_rule,) = torch.autograd.grad(-keep * q_y, z2)
        torch.testing.assert_close(grad_d, grad_rule, rtol=0, atol=1e-12)
        checked.add("below" if q_y < lam_prime else ("between" if q_y < lam else "above"))
    assert checked == {"below", "between", "above"}  # including where one-hot lambda-PR would still push


def test_grid_settings():
    names = [s.name for s in demo_grid.GRID]
    assert len(names) == len(set(names)) == 2 + 8 + 12 + 4 + 7
    from recall_dist import build_loss

    for s in demo_grid.PRECISION:  # every Precision-side setting builds
        build_loss(s.loss, **s.params)
    assert {s.loss for s in demo_grid.PRECISION} == {"dft", "prob_power", "prob_threshold", "cdiv"}
    assert all(s.params["alpha"] < 1 for s in demo_grid.PRECISION if s.loss == "cdiv")
    soft = {s.name: s.params for s in demo_grid.LAMBDA_PR if "soft" in s.name}
    assert soft["lambda_pr-soft0.5-mix0.5"] == {"lam": 0.1765, "nll_mix": 0.5}
    assert soft["lambda_pr-soft0.75-mix0.9"] == {"lam": 0.0968, "nll_mix": 0.9}


def test_precision_report_from_hand_made_curves():
    """precision_rules.md: values at T = 1 (the grid point), differences from NLL, the counts of rules
    that trade Recall for Precision, and the command that reproduces the run."""
    nll = [(0.5, 0.999, 0.70), (1.0, 0.987, 0.80), (2.0, 0.90, 0.75)]
    curves = {
        "nll": nll,
        "dft": [(0.5, 0.9999, 0.60), (1.0, 0.995, 0.72), (2.0, 0.95, 0.77)],
        "cdiv-0.8": [(0.5, 0.999, 0.70), (1.0, 0.987, 0.801), (2.0, 0.90, 0.75)],  # a tie with NLL
    }
    rows = {r["model"]: r for r in demo_grid.precision_rows(curves)}
    assert rows["dft"]["precision_t1"] == 0.995 and rows["dft"]["max_recall"] == 0.77
    assert rows["dft"]["delta_recall_t1"] == pytest.approx(-0.08)
    text = demo_grid.precision_markdown(curves)
    assert "| dft | `{}` | 0.9950 | 0.720 | 0.770 |" in text
    # NLL cooled to P >= 0.995: between T = 0.5 (0.999, 0.70) and T = 1 (0.987, 0.80), interpolated
    assert 0.70 < rows["dft"]["nll_recall_at_same_precision"] < 0.80
    assert "Higher Precision at T = 1 than NLL (by more than 0.0001): 1 of 2 (dft)." in text
    assert "Both (the expected Precision-side trade at T = 1): 1 of 2." in text
    assert "`recall-dist demo --grid --only dft,cdiv-0.8`" in text
    assert demo_grid.reproduce_command({s.name: nll for s in demo_grid.GRID}) == "make demo-grid"


def test_only_selects_models_and_keeps_the_reference():
    from recall_dist.demo.pipeline import LOSSES
    from recall_dist.demo.runner import select_models

    chosen = select_models(demo_grid.GRID, "cdiv-0.5, dft")
    assert [s.name for s in chosen] == ["nll", "dft", "cdiv-0.5"]  # the grid's order
    assert [s.name for s in select_models(LOSSES, "cdiv-2.0")] == ["nll", "cdiv-2.0"]
    assert select_models(LOSSES, "dft").startswith("unknown model 'dft'; choices: nll, cdiv-1.4")
    assert select_models(LOSSES, " , ") == "no model named"
