"""CUDA checks (run on a GPU machine: ``pytest -m gpu tests/parallel/test_gpu.py``): bf16 fused
loss on the GPU against the fp64 CPU reference, and its memory footprint vs materialised logits."""

import pytest
import torch

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from tests.parallel.cases import RULE_CASES, case_id
from tests.reference import NaiveTruncState, naive_loss

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gpu marker)")


@needs_cuda
@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_bf16_cuda_matches_fp64_reference(entry, case):
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
        out = fused_linear_loss(h, w, target.cuda(), loss, chunk_size=256)
        gh, gw = torch.autograd.grad(out.loss, (h, w))
    else:
        logits = (h @ w.t()).detach().requires_grad_()
        out = vocab_parallel_loss(logits, target.cuda(), loss)
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
def test_fused_peak_memory_is_a_fraction_of_materialised_logits():
    n, hdim, vocab = 8192, 2048, 128256
    h = torch.randn(n, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hdim, device="cuda") * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    naive = _peak_extra(lambda: torch.nn.functional.cross_entropy((h @ w.t()).float(), y).backward())
    h.grad = w.grad = None
    ours = _peak_extra(fused_linear_loss(h, w, y, build_loss("cdiv")).loss.backward)
    assert ours < naive / 4, (ours / 2**20, naive / 2**20)
