"""The GEMMs of both fused-head kernels (the PyTorch path of ``fused_linear.py`` and the Triton path of
``triton_ops.py`` / ``triton_single.py``): ``a @ b`` with the result, or the accumulator, in fp32 (the
accumulation dtype) whatever the inputs' dtype.  One rule:

- inputs already in the result's dtype (fp32, or fp64 on the PyTorch path): a plain GEMM;
- bf16/fp16 CUDA inputs: one GEMM that writes fp32 (``torch.mm`` / ``torch.addmm`` with
  ``out_dtype``, PyTorch >= 2.8): fp32 accumulation, one rounding, no fp32 copy of the inputs;
- otherwise -- CPU tensors (the CPU path, and the Triton kernels under ``TRITON_INTERPRET=1``), or CUDA
  on a PyTorch without ``out_dtype`` -- the GEMM in the inputs' dtype, then cast: no extra memory, the
  product rounded once to the inputs' precision.  On CUDA that fallback loses precision the loss would
  otherwise keep, so it is reported once per process (``recall-dist parallel: WARNING: ...``).

Which kernel runs these GEMMs is the ``loss.kernel`` choice (``$RECALL_DIST_KERNEL``; ``docs/kernels.md``).
"""

from __future__ import annotations

import torch

from recall_dist.log import get_logger

# Whether torch.(add)mm(..., out_dtype=...) works for CUDA here; cleared by the first failure.
_OUT_DTYPE = {"mm": True, "addmm": True}


def _no_out_dtype(op: str, error: Exception) -> None:
    if all(_OUT_DTYPE.values()):  # the first failure of either op: say it once
        get_logger("parallel").warning(
            f"torch.{op}(..., out_dtype=torch.float32) is unavailable for CUDA in this PyTorch ({error}); the "
            "loss head's bf16/fp16 GEMMs run in the inputs' dtype and are cast to fp32 (logit and gradient chunks "
            "rounded to bf16/fp16).  PyTorch >= 2.8 keeps them in fp32.  The head kernel is chosen by loss.kernel "
            "(or $RECALL_DIST_KERNEL)"
        )
    _OUT_DTYPE[op] = False


def mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a @ b`` returned in ``dtype`` (see the module docstring for how)."""
    if a.dtype != dtype and a.is_cuda and _OUT_DTYPE["mm"]:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError) as e:  # an older PyTorch, or an op missing for this backend
            _no_out_dtype("mm", e)
    return (a @ b).to(dtype)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in place, ``acc`` in the accumulation dtype, ``a`` and ``b`` in any float dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _OUT_DTYPE["addmm"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError) as e:
            _no_out_dtype("addmm", e)
    acc.add_(mm(a, b, acc.dtype))
