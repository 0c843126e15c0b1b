"""Launchers of the Triton kernels (``triton_kernels.py``) and the GEMMs around them: per-token
statistics and gradients of one vocabulary shard, for the fused head and for a logits shard.

Two matmul engines for the fused head (``KernelOptions.head_matmul``: ``loss.head_matmul`` or
``$RECALL_DIST_HEAD_MATMUL``, ``docs/kernels.md``), same results, different speed:

- ``triton`` (default): the logits of a tile live only in registers (``tl.dot`` inside the
  statistics and gradient kernels); no logits tensor at all.
- ``cublas``: cuBLAS writes one vocabulary chunk of fp32 logits ``[n, chunk]`` and the logits
  kernels reduce it (statistics) or turn it into ``d`` (gradients): bounded extra memory, cuBLAS
  matmul speed, one more read and write of each chunk.

Either way dW and dH come from cuBLAS: ``dW[chunk] = d^T @ h`` is complete in one GEMM (fp32
accumulation over all kept tokens, one rounding) and ``dH += d @ W[chunk]`` accumulates in fp32
(``matmul.py``: the GEMM helpers both kernels share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recall_dist.parallel.matmul import addmm_, mm


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the head kernels.  ``splits``: how many vocabulary splits the statistics pass
    spreads a token block over (more programs than SMs at any batch size); fixed per model, so the
    kernels compile once."""

    block_n: int = 128
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int = 16


def default_tiles(dtype: torch.dtype, override: tuple[int, ...] | None = None) -> Tiles:
    """Hopper-sized tiles on the GPU, or ``override`` (``KernelOptions.triton_tiles``: ``loss.triton_tiles``
    or ``$RECALL_DIST_TRITON_TILES``, for tuning); 32-wide tiles under the interpreter, so small tests cross
    tile edges."""
    from recall_dist.parallel.triton_kernels import INTERPRET

    if INTERPRET:
        return Tiles(32, 32, 32, 1, 1, 2)
    if override is not None:
        return Tiles(*override)
    return Tiles(block_k=32, num_stages=2) if dtype == torch.float32 else Tiles()


def _kernel_flags(dtype: torch.dtype) -> dict:
    from recall_dist.parallel.triton_kernels import INTERPRET

    # fp32 inputs follow torch's own matmul setting (exact fp32 unless TF32 is allowed)
    precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16, "PRECISION": precision}


def vocab_chunk(n_kept: int, hidden: int, n_cols: int, block_v: int, chunk_size: int | None) -> int:
    """Vocabulary columns per chunk: a chunk [n_kept, width] holds as many elements as ``chunk_size``
    tokens of the PyTorch path would (default: max(n_kept x H, 4M)), in whole tiles."""
    budget = chunk_size * n_cols if chunk_size is not None else max(n_kept * hidden, 1 << 22)
    cols = max(block_v, budget // max(n_kept, 1) // block_v * block_v)
    return min(cols, cdiv(n_cols, block_v) * block_v)


def merge_partials(m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor):
    """Per-token (max, sum-exp, target logit) from partials [parts, n] over disjoint column sets."""
    top = m.max(dim=0).values
    finite = ~torch.isneginf(m)
    rescale = torch.where(finite, torch.exp(m - torch.where(finite, top, 0.0)), 0.0)
    return top, (s * rescale).sum(dim=0), zt.sum(dim=0)


def _rows_of(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h[rows] as a contiguous matrix for cuBLAS (h itself when rows are all of h, in order)."""
    n = rows.numel()
    if n == h.shape[0] and bool((rows == torch.arange(n, device=rows.device)).all()):
        return h
    return h[rows]


def head_statistics(
    h, w, rows, target_col, n_cols: int, tiles: Tiles | None = None, chunk_size=None, engine: str = "triton"
):
    """fp32 (max, sum exp(z - max), target logit) per token of the logits ``h[rows] @ w[:n_cols].T``.

    ``h`` [N, H], ``w`` [V_local, H] (unit stride along H), ``rows`` [n] long, ``target_col`` [n]: the
    target's column in this shard or -1.  ``engine``: ``triton`` or ``cublas`` (the module docstring).
    """
    from recall_dist.parallel import triton_kernels as K

    n = rows.numel()
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    s, zt = torch.zeros_like(m), torch.zeros_like(m)
    if n == 0 or n_cols == 0:  # a shard made only of vocabulary padding
        return m, s, zt
    t = tiles or default_tiles(h.dtype)
    if engine == "cublas":
        h_kept, all_rows = _rows_of(h, rows), torch.arange(n, device=h.device)
        width = vocab_chunk(n, h.shape[1], n_cols, t.block_v, chunk_size)
        parts = []
        for col0 in range(0, n_cols, width):
            cols = min(width, n_cols - col0)
            local = torch.where((target_col >= col0) & (target_col < col0 + cols), target_col - col0, -1)
            parts.append(logits_statistics(mm(h_kept, w[col0 : col0 + cols].t()), all_rows, local, cols))
        return merge_partials(*(torch.stack(p) for p in zip(*parts, strict=True)))
    n_tiles = cdiv(n_cols, t.block_v)
    per_split = cdiv(n_tiles, min(t.splits, n_tiles))
    splits = cdiv(n_tiles, per_split)
    parts = torch.empty((3, splits, n), dtype=torch.float32, device=h.device)
    K.head_stats_kernel[(cdiv(n, t.block_n), splits)](
        h, w, rows, target_col, parts[0], parts[1], parts[2], n, n_cols, h.stride(0), w.stride(0),
        HIDDEN=h.shape[1], TILES_PER_SPLIT=per_split, BLOCK_N=t.block_n, BLOCK_V=t.block_v,
        BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages, **_kernel_flags(h.dtype),
    )  # fmt: skip
    return merge_partials(*parts)


def head_gradients(
    h, w, rows, target_col, lse, coef, n_cols: int, *, need_h, need_w, chunk_size=None, tiles=None, engine="triton"
):
    """Gradients of sum_n coef_n * nll_n w.r.t. ``h`` [N, H] and ``w`` [V_local, H], for tokens
    ``rows`` (only those with coef != 0 are recomputed).  Returns (dh or None, dw or None) in the
    input dtypes; rows of ``w`` at or past ``n_cols`` (vocabulary padding) get zero gradient."""
    from recall_dist.parallel import triton_kernels as K

    keep = (coef != 0).nonzero().squeeze(1)
    rows, target_col, lse, coef = rows[keep], target_col[keep], lse[keep].to(torch.float32), coef[keep]
    n = rows.numel()
    if n == 0 or n_cols == 0:
        return (torch.zeros_like(h) if need_h else None), (torch.zeros_like(w) if need_w else None)
    t = tiles or default_tiles(h.dtype)
    # Coefficients carry 1/Z (tiny): d holds coef / max(coef) and the GEMMs scale back in fp32, so
    # fp16 inputs do not flush it to zero.
    cmax = coef.max()
    scale, alpha = (coef / cmax).to(torch.float32), float(cmax)
    h_kept = _rows_of(h, rows)
    dw = torch.empty_like(w) if need_w else None
    if need_w:
        dw[n_cols:].zero_()  # vocabulary padding; every other row is written by one GEMM below
    dh_acc = torch.zeros((n, h.shape[1]), dtype=torch.float32, device=h.device) if need_h else None
    width = vocab_chunk(n, h.shape[1], n_cols, t.block_v, chunk_size)
    d = torch.empty((n, width), dtype=h.dtype, device=h.device)
    cublas = engine == "cublas"
    for col0 in range(0, n_cols, width):
        cols = min(width, n_cols - col0)
        dc, wc = d[:, :cols], w[col0 : col0 + cols]
        if cublas:
            local = torch.where((target_col >= col0) & (target_col < col0 + cols), target_col - col0, -1)
            _logits_grad(mm(h_kept, wc.t()), dc, torch.arange(n, device=h.device), local, lse, scale, cols)
        else:
            K.head_grad_kernel[(cdiv(n, t.block_n), cdiv(cols, t.block_v))](
                h, w, rows, target_col, lse, scale, d, n, col0, cols, h.stride(0), w.stride(0), d.stride(0),
                HIDDEN=h.shape[1], BLOCK_N=t.block_n, BLOCK_V=t.block_v, BLOCK_K=t.block_k,
                num_warps=t.num_warps, num_stages=t.num_stages, **_kernel_flags(h.dtype),
            )  # fmt: skip
        if need_w:  # this chunk of dW is complete in one GEMM (fp32 accumulation, one rounding)
            torch.addmm(dw[col0 : col0 + cols], dc.t(), h_kept, beta=0, alpha=alpha, out=dw[col0 : col0 + cols])
        if need_h:
            addmm_(dh_acc, dc, wc)
    if not need_h:
        return None, dw
    kept_grad = dh_acc.mul_(cmax.to(torch.float32)).to(h.dtype)
    del dh_acc
    if h_kept is h:
        return kept_grad, dw
    return torch.zeros_like(h).index_copy_(0, rows, kept_grad), dw


# (rows, columns) a program of the logits kernels handles at once: memory-bound, so one wide row on
# the GPU; blocks of rows under the interpreter, whose cost is per program.
LOGITS_TILE = (1, 2048)
LOGITS_TILE_INTERPRETED = (16, 32)


def _logits_tile() -> tuple[int, int]:
    from recall_dist.parallel.triton_kernels import INTERPRET

    return LOGITS_TILE_INTERPRETED if INTERPRET else LOGITS_TILE


def logits_statistics(x, rows, target_col, n_cols: int):
    """fp32 (max, sum-exp, target logit) of rows ``rows`` of a logits shard ``x`` [N, V_local] (unit
    column stride) over its first ``n_cols`` columns; one read of each row."""
    from recall_dist.parallel import triton_kernels as K

    n = rows.numel()
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=x.device)
    s, zt = torch.zeros_like(m), torch.zeros_like(m)
    if n and n_cols:
        r, c = _logits_tile()
        K.logits_stats_kernel[(cdiv(n, r),)](
            x, rows, target_col, m, s, zt, n, x.stride(0), N_COLS=n_cols, ROWS=r, BLOCK_V=c
        )
    return m, s, zt


def _logits_grad(x, out, rows, target_col, lse, scale, n_cols: int) -> None:
    """out[rows, :n_cols] = scale * (exp(x[rows] - lse) - onehot(target)), in ``out``'s dtype."""
    from recall_dist.parallel import triton_kernels as K

    r, c = _logits_tile()
    K.logits_grad_kernel[(cdiv(rows.numel(), r),)](
        x, out, rows, target_col, lse, scale, rows.numel(), x.stride(0), out.stride(0), N_COLS=n_cols, ROWS=r, BLOCK_V=c
    )


def logits_gradient(x, rows, target_col, lse, coef, n_cols: int) -> torch.Tensor:
    """Gradient of sum_n coef_n * nll_n w.r.t. the logits shard ``x`` (zero outside kept tokens and
    padded columns), in ``x``'s dtype."""
    grad = torch.zeros_like(x)
    keep = (coef != 0).nonzero().squeeze(1)
    if keep.numel() and n_cols:
        lse, coef = lse[keep].to(torch.float32), coef[keep].to(torch.float32)
        _logits_grad(x, grad, rows[keep], target_col[keep], lse, coef, n_cols)
    return grad
