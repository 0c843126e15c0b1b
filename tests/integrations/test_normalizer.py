"""``StepNormalizer`` (a step whose token count is not known in advance), applied to a plain model with
``train/step_scale.py``'s ``scale_gradients_``: micro-batches give the one-call gradient (the reference:
the whole batch in one call, whose normaliser is its own), and a skipped step leaves the model and Adam
as they were."""

from __future__ import annotations

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss
from recall_dist.integrations.normalizer import StepNormalizer
from recall_dist.losses.accumulator import SKIP
from recall_dist.train.step_scale import scale_gradients_

B, T, H, V = 8, 6, 10, 24


class Head(torch.nn.Module):
    """A plain model: hidden states (a parameter) and an output weight, the loss on top."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = torch.nn.Parameter(torch.randn(B, T, H, generator=g, dtype=torch.float64) * 2.0)
        self.weight = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64))

    def forward(self, rows, target, loss):
        return fused_linear_loss(self.hidden[rows], self.weight, target[rows], loss, chunk_size=7)


def targets(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (B, T), generator=g)
    target[2, :3] = -100
    return target


def accumulate(model: Head, target, loss, pieces: int) -> StepNormalizer:
    step = StepNormalizer(loss)
    for rows in torch.arange(B).chunk(pieces):
        out = model(rows, target, loss)
        step.add(out.loss, out.stats).backward()
    return step


@pytest.mark.parametrize("params", [{"alpha": 2.0}, {"alpha": 1.4, "normalize": "tokens"}], ids=["weights", "tokens"])
def test_micro_batches_give_the_one_call_gradient(params):
    target = targets(0)
    reference = Head(1)
    reference(torch.arange(B), target, build_loss("cdiv", **params)).loss.backward()
    model = Head(1)
    step = accumulate(model, target, build_loss("cdiv", **params), 4)
    assert not step.skipped and step.grad_scale() != 1.0  # D_0 / D_step: the rescale does something
    scale_gradients_([model], step.grad_scale())
    for got, ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-13)


def _assert_no_update(model: Head, before: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    assert all(p.grad is None for p in model.parameters())  # dropped: the optimizer leaves them alone
    optimizer.step()
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, equal_nan=True)  # no NaN beyond the planted one
    assert len(optimizer.state) == 0


def test_a_step_without_a_valid_token_is_skipped():
    """Every label ignored: SKIP, no division by zero, and with the adapter no Adam update (Adam with a
    zero gradient and weight decay would still move the weights)."""
    model = Head(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    step = accumulate(model, torch.full((B, T), -100), build_loss("cdiv", alpha=2.0), 2)
    assert step.skipped and step.grad_scale() == SKIP == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    scale_gradients_([model], step.grad_scale())
    _assert_no_update(model, before, optimizer)


def test_a_non_finite_micro_batch_skips_the_step():
    """A non-finite logit in the second micro-batch: the first one's finite gradient never reaches Adam."""
    model = Head(3)
    with torch.no_grad():
        model.hidden[B - 1, 0, 0] = float("nan")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    step = accumulate(model, targets(3), build_loss("cdiv", alpha=2.0), 2)
    assert torch.count_nonzero(model.weight.grad) > 0  # the finite micro-batch did form a gradient
    assert step.skipped and step.grad_scale() == SKIP
    scale_gradients_([model], step.grad_scale())
    _assert_no_update(model, before, optimizer)
