"""CUDA checks (run on a GPU machine: ``pytest -m gpu tests/parallel/test_gpu.py``): both entry points
on the GPU, on the PyTorch path and on the Triton path (both matmul engines), against the fp64 CPU
reference: every rule, bf16 and fp32, ignore_index, a padded vocabulary, TP=2 emulated on one GPU;
and the memory footprint vs materialised logits."""

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from tests.parallel.cases import RULE_CASES, case_id
from tests.reference import NaiveTruncState, naive_loss

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)")


@needs_cuda
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_bf16_cuda_matches_fp64_reference(entry, case, kernel):
    name, params = case
    g = torch.Generator().manual_seed(0)
    b, t, hdim, vocab = 8, 128, 256, 5000
    hidden = torch.randn(b, t, hdim, generator=g).bfloat16()
    weight = (torch.randn(vocab, hdim, generator=g) * 0.05).bfloat16()
    target = torch.randint(0, vocab, (b, t), generator=g)
    target[0, :10] = -100
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    seq = torch.arange(b).unsqueeze(1).expand(b, t).reshape(-1)
    ref = naive_loss(
        (h64 @ w64.t()).reshape(-1, vocab),
        target.reshape(-1),
        name,
        params,
        seq_ids=seq,
        state=NaiveTruncState(params.get("buffer_size", 10**6)),
    )
    rgh, rgw = torch.autograd.grad(ref, (h64, w64))
    h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    loss = build_loss(name, **params)
    if entry == "fused":
        out = fused_linear_loss(h, w, target.cuda(), loss, chunk_size=256, kernel=kernel)
        gh, gw = torch.autograd.grad(out.loss, (h, w))
    else:
        logits = (h @ w.t()).detach().requires_grad_()
        out = vocab_parallel_loss(logits, target.cuda(), loss, kernel=kernel)
        (gl,) = torch.autograd.grad(out.loss, logits)
        gh, gw = torch.autograd.grad(h @ w.t(), (h, w), gl)
    assert out.stats["loss"] == pytest.approx(float(ref), rel=2e-2)
    assert (gh.double().cpu() - rgh).abs().max() <= 5e-2 * rgh.abs().max()
    assert (gw.double().cpu() - rgw).abs().max() <= 5e-2 * rgw.abs().max()


def _peak_extra(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@needs_cuda
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_fused_peak_memory_is_a_fraction_of_materialised_logits(kernel):
    n, hdim, vocab = 8192, 2048, 128256
    h = torch.randn(n, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hdim, device="cuda") * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    naive = _peak_extra(lambda: torch.nn.functional.cross_entropy((h @ w.t()).float(), y).backward())
    h.grad = w.grad = None
    ours = _peak_extra(fused_linear_loss(h, w, y, build_loss("cdiv"), kernel=kernel).loss.backward)
    assert ours < naive / 4, (ours / 2**20, naive / 2**20)


# GPU-sized cases of the Triton path's checks (tests/parallel/test_triton_head.py): 1024 tokens,
# H=256, 5000 real columns + 8 padded rows, default (Hopper) tiles.
GPU_SHAPE = {"b": 8, "t": 128, "hdim": 256, "vocab": 5000, "pad": 8, "scale": 0.05}


def _triton_checks():
    pytest.importorskip("triton")
    from tests.parallel import test_triton_head

    return test_triton_head


# The matmul engine and the schedule only concern the fused head: the logits entry runs once.
ENTRY_ENGINES = [("fused", "triton"), ("fused", "cublas"), ("fused", "single"), ("logits", "triton")]


@needs_cuda
@pytest.mark.parametrize("entry,engine", ENTRY_ENGINES, ids=[f"{e}-{g}" for e, g in ENTRY_ENGINES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_triton_path_matches_fp64_reference(entry, case, dtype, engine, monkeypatch):
    if engine == "single":  # the single-pass schedule (per-token rules; the others fall back)
        monkeypatch.setenv("RECALL_DIST_HEAD_SCHEDULE", "single")
    else:
        monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", engine)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _triton_checks().check_against_reference(entry, case, dtype, "cuda", tol, **GPU_SHAPE)


@needs_cuda
@pytest.mark.parametrize("engine", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_tp2_emulation_equals_unsplit(dtype, engine):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    _triton_checks().check_tp2_emulation(dtype, "cuda", tol, engine=engine, **GPU_SHAPE)


@needs_cuda
def test_auto_dispatch_takes_triton_on_cuda():
    pytest.importorskip("triton")
    from recall_dist.parallel.triton_head import use_triton

    assert use_triton(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    assert not use_triton(torch.zeros(1, device="cuda", dtype=torch.float64))  # fp64: the PyTorch path
