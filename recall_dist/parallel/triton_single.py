"""The single-pass schedule of the Triton path (``KernelOptions.head_schedule="single"``: ``loss.head_schedule``
or ``$RECALL_DIST_HEAD_SCHEDULE``, ``docs/kernels.md``), for rules whose
weight depends only on the token's own NLL (nll, cdiv, lambda_pr without ``nll_mix``).

Token chunk by token chunk: cuBLAS writes the chunk's fp32 logits ``[c, V/tp]``, a Triton kernel
reduces them to (max, sum-exp, target logit), the three numbers are reduced over TP, the rule weights
the chunk, and a second Triton kernel turns the same logits into ``w * (softmax - onehot)``; cuBLAS
then adds the chunk's dW into an fp32 ``V/tp x H`` accumulator and writes its dH rows.  The global
normaliser Z scales both gradients at the end.  6 N H V/tp flops, as plain cross-entropy, paid for
with the fp32 weight-gradient accumulator (``4 V H / tp`` bytes) that the default recompute schedule
(``triton_ops.head_gradients``) does without.  Which one is faster is for ``benchmarks/loss_bench.py``
to say on the GPU (methods ``name@single``).
"""

from __future__ import annotations

import torch

from recall_dist.distributed.collectives import group_size
from recall_dist.parallel.common import chunk_rows, finalize, finite_token_weights, reduce_lse, reduce_max
from recall_dist.parallel.matmul import addmm_, mm
from recall_dist.parallel.triton_ops import _logits_grad, logits_statistics


def single_pass_head(h, w, tokens, target_col, loss, tp_group, dp_group, *, chunk_size, need_h: bool, need_w: bool):
    """(local loss, stats, grad_h, grad_w) of the fused head in one pass over token chunks."""
    n_cols, hidden = tokens.n_cols, h.shape[1]
    rows = chunk_rows(chunk_size, n_cols, len(tokens), hidden)
    dw_acc = torch.zeros((n_cols, hidden), dtype=torch.float32, device=h.device) if need_w else None
    dh_acc = torch.zeros((h.shape[0], hidden), dtype=torch.float32, device=h.device) if need_h else None
    wn = w[:n_cols]
    nlls, weights, finites = [], [], []
    for i in range(0, len(tokens), rows):
        idx, target = tokens.index[i : i + rows], target_col[i : i + rows]
        c = idx.numel()
        hc = h.index_select(0, idx)
        z = mm(hc, wn.t())  # [c, n_cols] fp32
        local = torch.arange(c, device=h.device)
        m, s, zt = logits_statistics(z, local, target, n_cols)
        lse, zt = reduce_lse(reduce_max(m, tp_group), m, s, zt, tp_group)
        nll, wt, finite = finite_token_weights(loss, lse - zt, dp_group)
        nlls.append(nll), weights.append(wt), finites.append(finite)
        if need_h or need_w:
            d = torch.empty((c, n_cols), dtype=h.dtype, device=h.device)
            _logits_grad(z, d, local, target, lse.to(torch.float32), wt.to(torch.float32), n_cols)
            del z
            if need_w:
                addmm_(dw_acc, d.t(), hc)
            if need_h:
                dh_acc.index_copy_(0, idx, mm(d, wn))
    empty = torch.zeros(0, dtype=torch.float64, device=h.device)
    nll = torch.cat(nlls) if nlls else empty
    wt = torch.cat(weights) if weights else empty
    finite = torch.cat(finites) if finites else empty.bool()
    a, _b, stats = finalize(loss, nll, wt, finite, dp_group)
    scale = a * group_size(dp_group)  # b == 0: single_pass rules have no nll_mix
    skipped = bool(stats[-1] > 0)  # a non-finite token anywhere: its NaN already reached the sums
    grad_w = grad_h = None
    for acc in (dw_acc, dh_acc):  # a skipped step's NaN rows must not survive a multiplication by 0
        if acc is not None:
            acc.zero_() if skipped else acc.mul_(scale.to(torch.float32))
    if need_w:
        grad_w = torch.zeros_like(w)
        grad_w[:n_cols] = dw_acc
        del dw_acc
    if need_h:
        grad_h = dh_acc.to(h.dtype)
    return (scale * (wt * nll).sum()).to(torch.float32), stats, grad_h, grad_w
