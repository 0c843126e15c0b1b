"""``KernelOptions`` (parallel/options.py): validation, the environment's overrides, how a call's
``kernel=`` resolves, and that the loss head's options reach the kernel -- ``loss.kernel=triton`` (the
Triton kernels under TRITON_INTERPRET on CPU) gives the default (PyTorch) path's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from recall_dist import build_loss
from recall_dist.parallel import KernelOptionError, KernelOptions, fused_linear_loss, triton_head
from recall_dist.parallel import fused_linear as fused_module
from recall_dist.parallel.options import ENV, parse_tiles

ENV_NAMES = tuple(ENV.values())


@pytest.fixture
def env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_values_are_validated():
    assert KernelOptions() == KernelOptions("auto", "recompute", "triton", None)
    for key, bad, allowed in [
        ("kernel", "cuda", "auto, torch, triton"),
        ("head_schedule", "twice", "recompute, single"),
        ("head_matmul", "cutlass", "triton, cublas"),
    ]:
        with pytest.raises(KernelOptionError, match=f"{key}='{bad}' is not allowed; allowed: {allowed}") as info:
            KernelOptions(**{key: bad})
        assert info.value.key == key
    assert parse_tiles("128, 128, 64, 8, 3, 16") == (128, 128, 64, 8, 3, 16) == parse_tiles([128, 128, 64, 8, 3, 16])
    for bad in ("1,2,3", "128,128,64,8,3", [128, 128, 48, 8, 3, 16], [128, 128, 64, 6, 3, 16], "a,b,c,d,e,f"):
        with pytest.raises(KernelOptionError, match="triton_tiles="):
            KernelOptions(triton_tiles=bad)
    with pytest.raises(KernelOptionError, match="triton_tiles="):
        KernelOptions(triton_tiles=[128.0, 128, 64, 8, 3, 16])


def test_environment_overrides_what_is_set(env):
    config = KernelOptions("torch", "single", "cublas", (64, 64, 32, 4, 2, 8))
    assert KernelOptions.from_env(config) == config  # nothing set: the config's choices
    env.setenv("RECALL_DIST_KERNEL", "triton")
    env.setenv("RECALL_DIST_HEAD_MATMUL", " ")  # blank: not set
    assert KernelOptions.from_env(config) == KernelOptions("triton", "single", "cublas", (64, 64, 32, 4, 2, 8))
    env.setenv("RECALL_DIST_TRITON_TILES", "16,16,16,1,1,1")
    assert KernelOptions.from_env(config).triton_tiles == (16, 16, 16, 1, 1, 1)
    assert KernelOptions.from_env(None, {"RECALL_DIST_HEAD_SCHEDULE": "single"}).head_schedule == "single"
    env.setenv("RECALL_DIST_TRITON_TILES", "64,64")
    with pytest.raises(KernelOptionError, match="RECALL_DIST_TRITON_TILES='64,64' is not allowed") as info:
        KernelOptions.from_env(config)
    assert info.value.key == "triton_tiles"


def test_how_a_call_resolves_kernel(env):
    given = KernelOptions(kernel="torch")
    env.setenv("RECALL_DIST_KERNEL", "triton")
    env.setenv("RECALL_DIST_HEAD_MATMUL", "cublas")
    assert KernelOptions.resolve(given) is given  # already merged by the loss head: used as given
    assert KernelOptions.resolve(None) == KernelOptions("triton", "recompute", "cublas")
    assert KernelOptions.resolve("torch") == KernelOptions("torch", "recompute", "cublas")  # the name wins


def _head(kernel_options):
    from recall_dist.train.loss_head import LossHead

    g = torch.Generator().manual_seed(0)
    owner = torch.nn.Linear(16, 40, bias=False)
    with torch.no_grad():
        owner.weight.copy_(torch.randn(40, 16, generator=g) * 0.7)
    hidden = torch.randn(2, 9, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=g)
    labels[0, :3] = -100
    head = LossHead(owner, build_loss("cdiv", alpha=1.4), vocab_size=40, chunk_size=5, kernel=kernel_options)
    loss, stats = head(hidden, labels)
    loss.backward()
    return stats, hidden.grad, owner.weight.grad


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("schedule,matmul", [("recompute", "triton"), ("single", "cublas")])
def test_the_loss_heads_choice_reaches_the_kernel(env, schedule, matmul):
    pytest.importorskip("triton")
    from recall_dist.parallel.triton_kernels import INTERPRET

    if not INTERPRET:
        pytest.skip("the CPU case needs TRITON_INTERPRET=1 (tests/conftest.py)")
    triton_calls = _spy(env, fused_module, "triton_fused_linear_loss")
    single_calls = _spy(env, triton_head, "single_pass_head")
    stats_calls = _spy(env, triton_head, "head_statistics")
    ref_stats, ref_gh, ref_gw = _head(None)  # the default, auto: the PyTorch path for CPU tensors
    assert triton_calls == []
    options = KernelOptions(kernel="triton", head_schedule=schedule, head_matmul=matmul)
    stats, gh, gw = _head(options)
    assert len(triton_calls) == 1 and triton_calls[0]["options"] == options
    assert len(single_calls) == (schedule == "single") and len(stats_calls) == (schedule == "recompute")
    for key in ("loss", "nll", "weight_mean", "tokens"):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5), key
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-6)
    # the head runs its options as given: a variable set after it was built changes nothing (the run's
    # start resolved the environment once: TrainConfig.with_environment, RecallTrainer's construction)
    env.setenv("RECALL_DIST_KERNEL", "torch")
    env.setenv("RECALL_DIST_HEAD_MATMUL", "cutlass")  # a head that read it again would raise
    _head(options)
    assert len(triton_calls) == 2 and triton_calls[1]["options"] == options


def test_vocab_parallel_takes_options():
    from recall_dist.parallel import vocab_parallel_loss

    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.randint(0, 10, (6,))
    a = vocab_parallel_loss(logits, target, build_loss("nll"), kernel=KernelOptions(kernel="torch"))
    b = fused_linear_loss(logits.detach(), torch.eye(10), target, build_loss("nll"), kernel="torch")  # logits @ I
    assert a.stats["loss"] == pytest.approx(b.stats["loss"], rel=1e-6)
