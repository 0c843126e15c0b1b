"""Triton kernels of the CUDA path (launched from ``triton_head.py``): per-token statistics and logit
gradients of the LM head, block by block, so that no ``N x V/tp`` logits tensor ever reaches HBM.

Four kernels, none of which knows which weight rule runs (the rule only changes the per-token
coefficients the gradient kernels are given):

- ``head_stats_kernel``: from hidden rows and the weight shard, logits tile by tile (``tl.dot`` over
  the hidden dimension, fp32 accumulation) with an online max / sum of exp and the target logit.
  Grid (token blocks, vocabulary splits); each split writes its partial (max, sum-exp, target logit).
- ``head_grad_kernel``: recomputes one vocabulary chunk of logits for the kept tokens and writes
  ``scale_n * (softmax - onehot)`` in the input dtype: the cuBLAS GEMMs that turn it into dW and dH
  follow in ``triton_head.py``.
- ``logits_stats_kernel`` / ``logits_grad_kernel``: the same for a materialised logits shard (a
  program per ``ROWS`` tokens: one read of each row forward, one read and one write backward).

Statistics are fp32 whatever the input dtype.  Loop bounds that are not ``constexpr`` would make the
CPU interpreter fail on NumPy >= 2.3 (it converts 1-element arrays with ``int()``), so the hidden
size and the tiles per split are ``constexpr``: they depend on the model, never on the batch, and so
compile once.  ``UPCAST`` (set only under ``TRITON_INTERPRET=1``) turns bf16 operands into fp32
before ``tl.dot``: Triton 3.6's interpreter multiplies bf16 bit patterns as integers.  The products
of bf16 values are exact in fp32, so the interpreted result is the one tensor cores give, up to
summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # fixed when the kernels below are decorated
# Token counts change every step (ignored and truncated tokens): never specialise on them, or a new
# divisibility of the count would recompile a kernel in the middle of training.


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    rows,
    mask_n,
    cols,
    mask_v,
    stride_h,
    stride_w,
    HIDDEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 logits [BLOCK_N, BLOCK_V] of hidden rows ``rows`` against weight rows ``cols``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    for k0 in range(0, HIDDEN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < HIDDEN
        a = tl.load(h_rows + ks[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=mask_v[None, :] & mask_k[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["n_tokens"])
def head_stats_kernel(
    h_ptr,
    w_ptr,
    rows_ptr,
    target_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    n_tokens,
    n_cols,
    stride_h,
    stride_w,
    HIDDEN: tl.constexpr,
    TILES_PER_SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial (max, sum exp(z - max), target logit) of tokens ``rows`` over this program's split of
    the shard's columns [0, n_cols); ``target`` is the shard-local target column, -1 if elsewhere."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs < n_tokens
    rows = tl.load(rows_ptr + offs, mask=mask_n, other=0)
    target = tl.load(target_ptr + offs, mask=mask_n, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    for t in range(TILES_PER_SPLIT):
        cols = (pid_s * TILES_PER_SPLIT + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = cols < n_cols
        z = _logits_tile(
            h_ptr, w_ptr, rows, mask_n, cols, mask_v, stride_h, stride_w,
            HIDDEN, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        zt += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        z = tl.where(mask_v[None, :], z, float("-inf"))  # padded columns never enter the softmax
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # a row with no real column yet keeps (-inf, 0): exp(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    out = pid_s * n_tokens + offs
    tl.store(max_ptr + out, m, mask=mask_n)
    tl.store(sumexp_ptr + out, s, mask=mask_n)
    tl.store(target_logit_ptr + out, zt, mask=mask_n)


@triton.jit(do_not_specialize=["n_tokens", "col0", "n_chunk_cols"])
def head_grad_kernel(
    h_ptr,
    w_ptr,
    rows_ptr,
    target_ptr,
    lse_ptr,
    scale_ptr,
    d_ptr,
    n_tokens,
    col0,
    n_chunk_cols,
    stride_h,
    stride_w,
    stride_d,
    HIDDEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """d[n, j] = scale_n * (exp(z[n, col0 + j] - lse_n) - 1[col0 + j == target_n]) for the columns
    [col0, col0 + n_chunk_cols) of the shard: the gradient of sum_n scale_n * nll_n w.r.t. the logits."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs < n_tokens
    rows = tl.load(rows_ptr + offs, mask=mask_n, other=0)
    target = tl.load(target_ptr + offs, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs, mask=mask_n, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask_n, other=0.0)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = local < n_chunk_cols
    cols = col0 + local
    z = _logits_tile(
        h_ptr, w_ptr, rows, mask_n, cols, mask_v, stride_h, stride_w,
        HIDDEN, BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    p = tl.exp(z - lse[:, None])
    p = tl.where(cols[None, :] == target[:, None], p - 1.0, p) * scale[:, None]
    d_ptrs = d_ptr + offs.to(tl.int64)[:, None] * stride_d + local[None, :]
    tl.store(d_ptrs, p.to(d_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


@triton.jit(do_not_specialize=["n_tokens"])
def logits_stats_kernel(
    x_ptr,
    rows_ptr,
    target_ptr,
    max_ptr,
    sumexp_ptr,
    target_logit_ptr,
    n_tokens,
    stride_x,
    N_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(max, sum exp(x - max), target logit) of ROWS tokens' logits rows over their first N_COLS columns."""
    offs = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_n = offs < n_tokens
    rows = tl.load(rows_ptr + offs, mask=mask_n, other=0).to(tl.int64)
    target = tl.load(target_ptr + offs, mask=mask_n, other=-1)
    # per-lane running max and sum, merged across lanes at the end
    m = tl.full((ROWS, BLOCK_V), float("-inf"), tl.float32)
    s = tl.zeros((ROWS, BLOCK_V), tl.float32)
    zt = tl.zeros((ROWS, BLOCK_V), tl.float32)
    for v0 in range(0, N_COLS, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (cols < N_COLS)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        zt += tl.where(cols[None, :] == target[:, None], x, 0.0)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    m_row = tl.max(m, axis=1)
    m_row_safe = tl.where(m_row == float("-inf"), 0.0, m_row)
    tl.store(max_ptr + offs, m_row, mask=mask_n)
    tl.store(sumexp_ptr + offs, tl.sum(s * tl.exp(m - m_row_safe[:, None]), axis=1), mask=mask_n)
    tl.store(target_logit_ptr + offs, tl.sum(zt, axis=1), mask=mask_n)


@triton.jit(do_not_specialize=["n_tokens"])
def logits_grad_kernel(
    x_ptr,
    grad_ptr,
    rows_ptr,
    target_ptr,
    lse_ptr,
    scale_ptr,
    n_tokens,
    stride_x,
    stride_g,
    N_COLS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """grad[row, :N_COLS] = scale * (exp(x - lse) - onehot(target)) for ROWS kept tokens."""
    offs = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask_n = offs < n_tokens
    rows = tl.load(rows_ptr + offs, mask=mask_n, other=0).to(tl.int64)
    target = tl.load(target_ptr + offs, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs, mask=mask_n, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask_n, other=0.0)
    for v0 in range(0, N_COLS, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = mask_n[:, None] & (cols < N_COLS)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None])
        g = tl.where(cols[None, :] == target[:, None], g - 1.0, g) * scale[:, None]
        tl.store(grad_ptr + rows[:, None] * stride_g + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
