"""``train/step_scale.py``, the one adapter that applies a step's gradient scale: on plain modules (and
Megatron-style ``main_grad`` buffers), on a real DeepSpeed ZeRO engine (gloo, CPU) -- the rescale equals
plain SGD on the scaled gradient, ``SKIP`` leaves the weights as they were, and an optimizer without the
external loss scale is a clear error -- and a skipped step (every label ignored) through the trainer on
ZeRO-2 and FSDP2: no update, no NaN, a normal step afterwards."""

from __future__ import annotations

import types

import pytest
import torch

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.losses.accumulator import SKIP
from recall_dist.train.step_scale import ZeroStepScale, require_loss_scale_hook, scale_gradients_
from tests.train.helpers import build, tiny_config_dict


def _model_with_grads(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model(torch.randn(4, 6)).square().mean().backward()
    return model


def test_scale_gradients_multiplies_every_gradient():
    model = _model_with_grads()
    expected = [p.grad * 2.5 for p in model.parameters()]
    scale_gradients_([model], 2.5)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


def test_skip_drops_gradients_and_zeroes_megatron_buffers():
    model = _model_with_grads()
    first = model[0].weight
    first.main_grad = torch.ones_like(first)  # where Megatron keeps a parameter's gradient: a buffer view
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    scale_gradients_([model], SKIP)
    assert torch.count_nonzero(first.main_grad) == 0 and first.grad is not None  # zeroed, not dropped
    assert all(p.grad is None for p in model.parameters() if p is not first)
    first.grad = None  # (Megatron's optimizer reads main_grad; a torch one would see the zero buffer's copy)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "2"])
def test_a_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match=r"gradient scale must be a finite number >= 0 \(SKIP = 0.0"):
        scale_gradients_([_model_with_grads()], bad)


def test_an_optimizer_without_the_hook_is_an_error():
    optimizer = torch.optim.SGD(_model_with_grads().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"DeepSpeed \S+: its optimizer SGD has no external loss scale"):
        require_loss_scale_hook(optimizer)
    with pytest.raises(RuntimeError, match="missing: override_loss_scale, custom_loss_scaler, external_loss_scale"):
        ZeroStepScale(types.SimpleNamespace(optimizer=optimizer), rescales=True)


# ---------------------------------------------------------------- a real DeepSpeed ZeRO engine

LR = 0.1


def _zero_engine(stage: int):
    import deepspeed

    model = _model_with_grads(seed=1)
    model.zero_grad(set_to_none=True)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": 0.0,
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _full_params(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


def _zero_worker(stage: int) -> None:
    import deepspeed

    engine = _zero_engine(stage)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    reference = _model_with_grads(seed=1)
    reference.zero_grad()
    reference(x).square().mean().backward()
    scale = ZeroStepScale.for_engine(engine)
    assert ZeroStepScale.for_engine(engine) is scale  # one per engine: the inner step is wrapped once

    # a factor g: the update is plain SGD on g times the gradient
    before = _full_params(engine)
    engine.backward(engine(x).square().mean())
    with scale.applied(2.5):
        engine.step()
    zero = engine.optimizer
    assert zero.custom_loss_scaler is False and zero.external_loss_scale is None  # put back after the step
    for got, b, ref in zip(_full_params(engine), before, reference.parameters(), strict=True):
        torch.testing.assert_close(got, b - LR * 2.5 * ref.grad, rtol=1e-5, atol=1e-7)

    # SKIP: no loss scale of 1 / 0, no update, no NaN
    before = _full_params(engine)
    engine.backward(engine(x).square().mean())
    with scale.applied(SKIP):
        engine.step()
    assert all(torch.equal(g, b) for g, b in zip(_full_params(engine), before, strict=True))

    # the same engine with the external loss scale hidden: a clear error, before any update
    del zero.custom_loss_scaler
    message = rf"DeepSpeed {deepspeed.__version__}: its optimizer {type(zero).__name__} has no external loss scale"
    with pytest.raises(RuntimeError, match=message):
        ZeroStepScale.for_engine(engine)
    with pytest.raises(RuntimeError, match=r"missing: custom_loss_scaler\)"):
        scale.arm(2.5)
    scale.arm(SKIP)  # a skip needs no loss scale
    scale.disarm()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_rescale_skip_and_missing_hook(stage, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_distributed_test(_zero_worker, 1, stage)


# ---------------------------------------------------------------- a skipped step through the trainer


def _optimizer_state(engine) -> list:
    """The optimizer's non-empty per-parameter states (ZeRO links an empty one per partition after its
    first step, stepped or not)."""
    state = engine.ds.optimizer.optimizer.state if hasattr(engine, "ds") else engine.optimizer.state
    return [s for s in state.values() if s]


def params(engine) -> dict[str, torch.Tensor]:
    """Copies: on one rank a gathered FSDP2 parameter can share the live parameter's storage."""
    return {name: p.clone() for name, p in engine.full_parameters()}


def _skipped_step_worker(data: dict) -> None:
    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    batches = endless(run.batches)
    ignored = ({**b, "labels": torch.full_like(b["labels"], -100)} for b in batches)
    before = params(run.engine)
    stats = train_step(run, ignored)
    assert stats["skipped"] == 1.0 and stats["tokens"] == 0.0 and stats["loss"] == 0.0, stats
    assert stats["nonfinite_tokens"] == 0.0 and "grad_norm" not in stats, stats
    after = params(run.engine)
    assert all(torch.equal(after[n], p) for n, p in before.items()), "a skipped step moved the weights"
    assert len(_optimizer_state(run.engine)) == 0, "the optimizer stepped on a skipped step"
    stats = train_step(run, batches)  # the next, normal step updates
    assert stats["skipped"] == 0.0 and stats["loss"] > 0 and stats["grad_norm"] > 0, stats
    assert len(_optimizer_state(run.engine)) > 0
    moved = params(run.engine)
    assert any(not torch.equal(moved[n], p) for n, p in before.items())
    assert all(torch.isfinite(p).all() for p in moved.values())


@pytest.mark.parametrize("backend", [{"name": "deepspeed", "zero_stage": 2}, {"name": "fsdp2"}], ids=["zero2", "fsdp2"])
def test_a_step_without_a_valid_token_leaves_the_model(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    data = tiny_config_dict(tmp_path, backend=backend, train={"micro_batch_size": 4, "global_batch_size": 8})
    run_distributed_test(_skipped_step_worker, 1, data)
