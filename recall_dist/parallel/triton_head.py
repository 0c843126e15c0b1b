"""The CUDA path of both entry points: Triton kernels (``triton_kernels.py``) for the per-token
statistics and the logit gradients, cuBLAS for the two weight/hidden GEMMs, and the same rule seam,
TP reduction and DP normaliser as the PyTorch path (``common.global_coefficients``).

``fused_linear_loss`` on CUDA (``kernel="auto"``) runs:

1. ``head_statistics``: per token, (max, sum-exp, target logit) of this vocabulary shard, block by
   block: the logits never exist outside registers.
2. ``global_coefficients``: the TP reduction of those three numbers, the rule's weights of the
   detached NLL, the global normaliser Z over DP: a coefficient per token.
3. ``head_gradients`` (only for tokens with a non-zero coefficient: truncated tokens cost nothing):
   vocabulary chunk by chunk, the logits are recomputed and ``coef * (softmax - onehot)`` written in
   the input dtype; then ``dW[chunk] = d^T @ h`` (each chunk of dW complete in one GEMM, accumulated
   in fp32 over all tokens and rounded once) and ``dH += d @ W[chunk]`` (an fp32 accumulator).

That is 8 N H V/tp flops (the statistics pass, then recompute + two GEMMs) against 6 for plain
cross-entropy, bought for an exact fp32 dW without an fp32 V x H accumulator.  Gradients are formed
in the forward pass, as in the PyTorch path, so the backward never needs the (FSDP2/ZeRO-3
gathered) weight again.  The PyTorch path stays the CPU implementation and the reference; choose
with ``kernel=`` or the ``RECALL_DIST_KERNEL`` environment variable (``auto``, ``torch``, ``triton``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from recall_dist.losses.base import RecallLoss
from recall_dist.parallel.common import LossOutput, global_coefficients, prepare_tokens

KERNEL_ENV = "RECALL_DIST_KERNEL"
KERNELS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreted() -> bool:
    """Whether the kernels were decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from recall_dist.parallel.triton_kernels import INTERPRET

    return INTERPRET


def use_triton(tensor: torch.Tensor, kernel: str | None = None) -> bool:
    """Whether the loss on ``tensor`` runs the Triton path.

    ``kernel`` (default: ``$RECALL_DIST_KERNEL``, else ``auto``): ``auto`` takes Triton for CUDA
    tensors in bf16/fp16/fp32 when ``triton`` is importable; ``torch`` forces the PyTorch path;
    ``triton`` insists (an error says why it cannot run; CPU tensors only under ``TRITON_INTERPRET=1``).
    """
    choice = kernel if kernel is not None else os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNELS:
        source = "kernel" if kernel is not None else KERNEL_ENV
        raise ValueError(f"{source}={choice!r}; allowed: {', '.join(KERNELS)}")
    if choice == "torch":
        return False
    available = importlib.util.find_spec("triton") is not None
    if choice == "auto":
        return available and tensor.is_cuda and tensor.dtype in TRITON_DTYPES
    if not available:
        raise RuntimeError("kernel='triton' needs the triton package: pip install 'recall_dist[triton]'")
    if tensor.dtype not in TRITON_DTYPES:
        raise ValueError(f"kernel='triton' supports bf16, fp16 and fp32 inputs, got {tensor.dtype}")
    if not (tensor.is_cuda or _interpreted()):
        raise ValueError(
            f"kernel='triton' needs CUDA tensors (got {tensor.device}); set TRITON_INTERPRET=1 to run "
            "the kernels through Triton's CPU interpreter (tests)"
        )
    return True


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the head kernels.  ``splits``: how many vocabulary splits the statistics pass
    spreads a token block over (more programs than SMs at any batch size); fixed per model."""

    block_n: int = 128
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int = 16


def default_tiles(dtype: torch.dtype) -> Tiles:
    """Hopper-sized tiles on the GPU (``RECALL_DIST_TRITON_TILES=bn,bv,bk,warps,stages,splits``
    overrides them, for tuning); 16-wide tiles under the interpreter so small tests cross tile edges."""
    from recall_dist.parallel.triton_kernels import INTERPRET

    if INTERPRET:
        return Tiles(32, 32, 32, 1, 1, 2)
    override = os.environ.get("RECALL_DIST_TRITON_TILES")
    if override:
        values = [int(v) for v in override.split(",")]
        if len(values) != 6:
            raise ValueError(f"RECALL_DIST_TRITON_TILES={override!r}: expected bn,bv,bk,warps,stages,splits")
        return Tiles(*values)
    return Tiles(block_k=32, num_stages=2) if dtype == torch.float32 else Tiles()


def _kernel_flags(dtype: torch.dtype) -> dict:
    from recall_dist.parallel.triton_kernels import INTERPRET

    # fp32 inputs follow torch's own matmul setting (exact fp32 unless TF32 is allowed)
    precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16, "PRECISION": precision}


def head_statistics(h, w, rows, target_col, n_cols: int, tiles: Tiles | None = None):
    """fp32 (max, sum exp(z - max), target logit) per token of logits ``h[rows] @ w[:n_cols].T``.

    ``h`` [N, H], ``w`` [V_local, H] (unit stride along H), ``rows`` [n] long, ``target_col`` [n]: the
    target's column in this shard or -1.  No logits tensor is allocated.
    """
    from recall_dist.parallel import triton_kernels as K

    n = rows.numel()
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    s, zt = torch.zeros_like(m), torch.zeros_like(m)
    if n == 0 or n_cols == 0:  # a shard made only of vocabulary padding
        return m, s, zt
    t = tiles or default_tiles(h.dtype)
    n_tiles = triton_cdiv(n_cols, t.block_v)
    per_split = triton_cdiv(n_tiles, min(t.splits, n_tiles))
    splits = triton_cdiv(n_tiles, per_split)
    parts = torch.empty((3, splits, n), dtype=torch.float32, device=h.device)
    grid = (triton_cdiv(n, t.block_n), splits)
    K.head_stats_kernel[grid](
        h, w, rows, target_col, parts[0], parts[1], parts[2], n, n_cols, h.stride(0), w.stride(0),
        HIDDEN=h.shape[1], TILES_PER_SPLIT=per_split, BLOCK_N=t.block_n, BLOCK_V=t.block_v,
        BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages, **_kernel_flags(h.dtype),
    )  # fmt: skip
    m_split, s_split, zt_split = parts
    m = m_split.max(dim=0).values
    finite = ~torch.isneginf(m_split)
    rescale = torch.where(finite, torch.exp(m_split - torch.where(finite, m, 0.0)), 0.0)
    return m, (s_split * rescale).sum(dim=0), zt_split.sum(dim=0)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_OUT_DTYPE_MM = True  # torch.addmm(..., out_dtype=fp32) exists for CUDA in recent PyTorch


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with a, b in any float dtype, accumulated in fp32."""
    global _OUT_DTYPE_MM
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _OUT_DTYPE_MM:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # an older PyTorch: no out_dtype
            _OUT_DTYPE_MM = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def vocab_chunk(n_kept: int, hidden: int, n_cols: int, block_v: int, chunk_size: int | None) -> int:
    """Vocabulary columns per gradient chunk: the d buffer [n_kept, chunk] holds as many elements as
    ``chunk_size`` tokens of the PyTorch path would (default: max(n_kept x H, 4M)), in whole tiles."""
    budget = chunk_size * n_cols if chunk_size is not None else max(n_kept * hidden, 1 << 22)
    cols = max(block_v, budget // max(n_kept, 1) // block_v * block_v)
    return min(cols, triton_cdiv(n_cols, block_v) * block_v)


def head_gradients(
    h, w, rows, target_col, lse, coef, n_cols: int, *, need_h: bool, need_w: bool, chunk_size=None, tiles=None
):
    """Gradients of sum_n coef_n * nll_n w.r.t. ``h`` [N, H] and ``w`` [V_local, H], for tokens
    ``rows`` (only those with coef != 0 are recomputed).  Returns (dh or None, dw or None) in the
    input dtypes; rows of ``w`` at or past ``n_cols`` (vocabulary padding) get zero gradient."""
    from recall_dist.parallel import triton_kernels as K

    keep = (coef != 0).nonzero().squeeze(1)
    rows, target_col, lse, coef = rows[keep], target_col[keep], lse[keep], coef[keep]
    n = rows.numel()
    if n == 0 or n_cols == 0:
        return (torch.zeros_like(h) if need_h else None), (torch.zeros_like(w) if need_w else None)
    dw = torch.empty_like(w) if need_w else None
    if need_w:
        dw[n_cols:].zero_()  # vocabulary padding; every other row is written by one GEMM below
    t = tiles or default_tiles(h.dtype)
    # Coefficients carry 1/Z (tiny): d holds coef / max(coef), the GEMMs scale back in fp32, so
    # fp16 inputs do not flush it to zero.
    cmax = coef.max()
    scale = (coef / cmax).to(torch.float32)
    alpha = float(cmax)
    h_kept = h if n == h.shape[0] and bool((rows == torch.arange(n, device=rows.device)).all()) else h[rows]
    dh_acc = torch.zeros((n, h.shape[1]), dtype=torch.float32, device=h.device) if need_h else None
    width = vocab_chunk(n, h.shape[1], n_cols, t.block_v, chunk_size)
    d = torch.empty((n, width), dtype=h.dtype, device=h.device)
    lse = lse.to(torch.float32)
    for col0 in range(0, n_cols, width):
        cols = min(width, n_cols - col0)
        grid = (triton_cdiv(n, t.block_n), triton_cdiv(cols, t.block_v))
        K.head_grad_kernel[grid](
            h, w, rows, target_col, lse, scale, d, n, col0, cols, h.stride(0), w.stride(0), d.stride(0),
            HIDDEN=h.shape[1], BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k,
            num_warps=t.num_warps, num_stages=t.num_stages, **_kernel_flags(h.dtype),
        )  # fmt: skip
        dc, wc = d[:, :cols], w[col0 : col0 + cols]
        if need_w:  # each chunk of dW is complete in this one GEMM (fp32 accumulation, one rounding)
            torch.addmm(dw[col0 : col0 + cols], dc.t(), h_kept, beta=0, alpha=alpha, out=dw[col0 : col0 + cols])
        if need_h:
            _addmm_fp32_(dh_acc, dc, wc)
    if not need_h:
        return None, dw
    kept_grad = dh_acc.mul_(cmax.to(torch.float32)).to(h.dtype)
    del dh_acc
    if kept_grad.shape[0] == h.shape[0] and h_kept is h:
        return kept_grad, dw
    return torch.zeros_like(h).index_copy_(0, rows, kept_grad), dw


# (rows, columns) a program of the logits kernels handles at once: memory-bound, so one wide row on
# the GPU; blocks of rows under the interpreter, whose cost is per program.
LOGITS_TILE = (1, 2048)
LOGITS_TILE_INTERPRETED = (16, 32)


def logits_statistics(x, rows, target_col, n_cols: int):
    """fp32 (max, sum-exp, target logit) of rows ``rows`` of a logits shard ``x`` [N, V_local], over its
    first ``n_cols`` columns; one read of each row."""
    from recall_dist.parallel import triton_kernels as K

    n = rows.numel()
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    s, zt = torch.zeros_like(m), torch.zeros_like(m)
    if n and n_cols:
        r, c = LOGITS_TILE_INTERPRETED if K.INTERPRET else LOGITS_TILE
        K.logits_stats_kernel[(triton_cdiv(n, r),)](
            x, rows, target_col, m, s, zt, n, x.stride(0), N_COLS=n_cols, ROWS=r, BLOCK_V=c
        )
    return m, s, zt


def logits_gradient(x, rows, target_col, lse, coef, n_cols: int) -> torch.Tensor:
    """Gradient of sum_n coef_n * nll_n w.r.t. the logits shard ``x`` (zero outside kept tokens and
    padded columns), in ``x``'s dtype."""
    from recall_dist.parallel import triton_kernels as K

    grad = torch.zeros_like(x)
    keep = (coef != 0).nonzero().squeeze(1)
    n = keep.numel()
    if n and n_cols:
        r, c = LOGITS_TILE_INTERPRETED if K.INTERPRET else LOGITS_TILE
        K.logits_grad_kernel[(triton_cdiv(n, r),)](
            x, grad, rows[keep], target_col[keep], lse[keep].to(torch.float32), coef[keep].to(torch.float32),
            n, x.stride(0), grad.stride(0), N_COLS=n_cols, ROWS=r, BLOCK_V=c,
        )  # fmt: skip
    return grad


def _tokens(target, sequence_ids, ignore_index, vocab_size, local_vocab, tp_group):
    tokens = prepare_tokens(
        target,
        sequence_ids,
        ignore_index=ignore_index,
        vocab_size=vocab_size,
        local_vocab=local_vocab,
        tp_group=tp_group,
    )
    return tokens, torch.where(tokens.in_shard, tokens.local_target, -1)


class _TritonFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss, tp_group, dp_group, ignore_index, vocab_size, seq_ids, chunk):
        h = hidden.reshape(-1, hidden.shape[-1])
        h = h if h.stride(1) == 1 else h.contiguous()
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        tokens, target_col = _tokens(target, seq_ids, ignore_index, vocab_size, w.shape[0], tp_group)
        parts = [head_statistics(h, w, tokens.index, target_col, tokens.n_cols)] if len(tokens) else []
        lse, nll, coef, stats = global_coefficients(loss, tokens, parts, tp_group, dp_group, torch.float32, h.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = grad_w = None
        if need_h or need_w:
            grad_h, grad_w = head_gradients(
                h, w, tokens.index, target_col, lse, coef, tokens.n_cols, need_h=need_h, need_w=need_w, chunk_size=chunk
            )
        ctx.grad_h = None if grad_h is None else grad_h.view(hidden.shape)
        ctx.grad_w = grad_w
        ctx.mark_non_differentiable(stats)
        return (coef * nll).sum().to(torch.float32), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # e.g. gradient accumulation scaling
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


class _TritonVocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, loss, tp_group, dp_group, ignore_index, vocab_size, seq_ids):
        x = logits.reshape(-1, logits.shape[-1])
        x = x if x.stride(1) == 1 else x.contiguous()
        tokens, target_col = _tokens(target, seq_ids, ignore_index, vocab_size, x.shape[1], tp_group)
        parts = [logits_statistics(x, tokens.index, target_col, tokens.n_cols)] if len(tokens) else []
        lse, nll, coef, stats = global_coefficients(loss, tokens, parts, tp_group, dp_group, torch.float32, x.device)
        ctx.save_for_backward(x, tokens.index, target_col, lse, coef)
        ctx.n_cols, ctx.shape = tokens.n_cols, logits.shape
        ctx.mark_non_differentiable(stats)
        return (coef * nll).sum().to(torch.float32), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x, index, target_col, lse, coef = ctx.saved_tensors
        grad = logits_gradient(x, index, target_col, lse, coef * grad_loss.to(coef.dtype), ctx.n_cols)
        return grad.view(ctx.shape), None, None, None, None, None, None, None


def triton_fused_linear_loss(
    hidden, weight, target, loss: RecallLoss, *, tp_group, dp_group, ignore_index, vocab_size, chunk_size, sequence_ids
) -> LossOutput:
    """``fused_linear_loss`` on the Triton path (same arguments, checked by the caller)."""
    out, stats = _TritonFusedLinear.apply(
        hidden, weight, target, loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids, chunk_size
    )
    return LossOutput(out, stats, loss.rule.extra_stats())


def triton_vocab_parallel_loss(
    logits, target, loss: RecallLoss, *, tp_group, dp_group, ignore_index, vocab_size, sequence_ids
) -> LossOutput:
    """``vocab_parallel_loss`` on the Triton path (same arguments, checked by the caller)."""
    out, stats = _TritonVocabParallel.apply(
        logits, target, loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids
    )
    return LossOutput(out, stats, loss.rule.extra_stats())
