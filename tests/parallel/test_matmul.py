"""``parallel/matmul.py``: the one GEMM helper of both fused-head kernels -- its CPU rule (the GEMM in the
inputs' dtype, then cast) and the once-per-process report when CUDA's fp32-output GEMM is unavailable."""

from __future__ import annotations

import torch

from recall_dist.parallel import matmul


def test_cpu_rule():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(7, 3, generator=g)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = matmul.mm(a.to(dtype), b.to(dtype))
        assert out.dtype == torch.float32
        assert torch.equal(out, (a.to(dtype) @ b.to(dtype)).float())
    assert matmul.mm(a.double(), b.double(), torch.float64).dtype == torch.float64  # the fp64 reference path
    acc = torch.ones(5, 3)
    matmul.addmm_(acc, a.bfloat16(), b.bfloat16())
    assert torch.equal(acc, 1 + (a.bfloat16() @ b.bfloat16()).float())
    acc32 = torch.ones(5, 3)
    matmul.addmm_(acc32, a, b)
    torch.testing.assert_close(acc32, 1 + a @ b)


def test_fallback_is_reported_once(monkeypatch, capsys):
    monkeypatch.setattr(matmul, "_OUT_DTYPE", {"mm": True, "addmm": True})
    matmul._no_out_dtype("mm", TypeError("no out_dtype"))
    matmul._no_out_dtype("addmm", TypeError("no out_dtype"))
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1, err
    assert "recall-dist parallel: WARNING: torch.mm(..., out_dtype=torch.float32) is unavailable" in err
    assert "loss.kernel" in err and "RECALL_DIST_KERNEL" in err
    assert matmul._OUT_DTYPE == {"mm": False, "addmm": False}
