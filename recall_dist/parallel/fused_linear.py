"""``fused_linear_loss``: the recall loss from hidden states and the (local shard of the) output
weight, computed chunk by chunk so no ``N x V`` (or ``N x V/tp``) logits tensor ever exists.

Two schedules, chosen by a property of the loss (never by which rule runs):

* single pass (rules whose weight depends only on the token's own NLL: nll, cdiv, lambda_pr,
  without ``nll_mix``): per chunk, logits -> TP reduction of (max, sum-exp, target logit) -> weight
  -> gradient of the chunk formed right away.  The global normaliser Z is a single scalar applied
  at the end, after the DP all-reduce: 1 forward + 2 backward matmuls, like plain cross-entropy.
* two passes (truncation rules need every token of a sequence and the gathered buffer; ``nll_mix``
  needs two global scalars): pass 1 computes the log-sum-exp of every token, the rule weights the
  whole batch, pass 2 recomputes logits only for tokens with a non-zero coefficient.

Gradients are formed in the forward pass and kept until backward (Liger's fused-linear pattern);
statistics are fp32, the output-weight gradient accumulates in fp32 across chunks.
"""

from __future__ import annotations

import torch

from recall_dist.distributed.collectives import group_size
from recall_dist.losses.base import RecallLoss
from recall_dist.parallel.common import (LossOutput, Tokens, acc_dtype, check_shapes, chunk_partials, chunk_rows, finalize,
                                         prepare_tokens, reduce_lse, reduce_max, token_weights)


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (h @ w.t()).to(acc_dtype(h.dtype))


def _accumulate(p: torch.Tensor, hc: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                grad_h: torch.Tensor | None, grad_w: torch.Tensor | None) -> None:
    """dL/dh rows and dL/dW rows from the chunk's logit gradient ``p`` [c, n_cols] (fp32)."""
    g = p.to(hc.dtype)
    if grad_h is not None:
        grad_h.index_copy_(0, idx, (g @ w).to(grad_h.dtype))
    if grad_w is not None:
        n_cols = p.shape[1]
        if g.dtype == grad_w.dtype:
            grad_w[:n_cols].addmm_(g.t(), hc)
        else:
            grad_w[:n_cols] += (g.t() @ hc).to(grad_w.dtype)


def _single_pass(h, w, tokens: Tokens, loss: RecallLoss, tp_group, dp_group, rows, grad_h, grad_w):
    nlls, weights, finites = [], [], []
    for i in range(0, len(tokens), rows):
        sl = slice(i, i + rows)
        idx, target, in_shard = tokens.index[sl], tokens.local_target[sl], tokens.in_shard[sl]
        hc = h.index_select(0, idx)
        z = _logits(hc, w)
        local_max = z.max(dim=1).values if z.shape[1] else torch.full_like(z[:, 0], -float("inf"))
        zt = torch.where(in_shard, z.gather(1, target.unsqueeze(1)).squeeze(1), 0.0) if z.shape[1] \
            else torch.zeros_like(local_max)
        m = reduce_max(local_max, tp_group)
        e = z.sub_(m.unsqueeze(1)).exp_()  # in place: the chunk holds one fp32 buffer
        lse, zt = reduce_lse(m, m, e.sum(dim=1), zt, tp_group)
        nll, wt, finite = token_weights(loss, lse - zt, tokens, dp_group)
        p = e.div_(torch.exp(lse - m).unsqueeze(1))  # softmax
        hit = in_shard.nonzero().squeeze(1)
        p[hit, target[hit]] -= 1.0
        p.mul_(wt.to(p.dtype).unsqueeze(1))
        _accumulate(p, hc, idx, w, grad_h, grad_w)
        nlls.append(nll), weights.append(wt), finites.append(finite)
    empty = torch.zeros(0, dtype=torch.float64, device=h.device)
    nll = torch.cat(nlls) if nlls else empty
    wt = torch.cat(weights) if weights else empty
    finite = torch.cat(finites) if finites else empty.bool()
    a, b, stats = finalize(loss, nll, wt, finite, dp_group)
    scale = a * group_size(dp_group)  # b == 0 in this schedule
    skipped = bool(stats[-1] > 0)  # a non-finite token anywhere: its NaN already reached the sums
    for g in (grad_h, grad_w):
        if g is not None:
            g.zero_() if skipped else g.mul_(scale.to(g.dtype))
    return (scale * (wt * nll).sum()).to(acc_dtype(h.dtype)), stats


def _two_pass(h, w, tokens: Tokens, loss: RecallLoss, tp_group, dp_group, rows, grad_h, grad_w):
    parts = [chunk_partials(_logits(h.index_select(0, tokens.index[i:i + rows]), w),
                            tokens.local_target[i:i + rows], tokens.in_shard[i:i + rows])
             for i in range(0, len(tokens), rows)]
    empty = torch.zeros(0, dtype=acc_dtype(h.dtype), device=h.device)
    m, s, zt = (torch.cat(p) for p in zip(*parts)) if parts else (empty, empty, empty)
    lse, zt = reduce_lse(reduce_max(m, tp_group), m, s, zt, tp_group)
    nll, wt, finite = token_weights(loss, lse - zt, tokens, dp_group, tokens.sequence_ids)
    a, b, stats = finalize(loss, nll, wt, finite, dp_group)
    coef = (a * wt + b) * group_size(dp_group)
    if grad_h is not None or grad_w is not None:
        keep = (coef != 0).nonzero().squeeze(1)  # truncated tokens cost no second pass
        for i in range(0, keep.numel(), rows):
            k = keep[i:i + rows]
            idx, target, in_shard = tokens.index[k], tokens.local_target[k], tokens.in_shard[k]
            hc = h.index_select(0, idx)
            p = _logits(hc, w).sub_(lse[k].unsqueeze(1)).exp_()
            hit = in_shard.nonzero().squeeze(1)
            p[hit, target[hit]] -= 1.0
            p.mul_(coef[k].to(p.dtype).unsqueeze(1))
            _accumulate(p, hc, idx, w, grad_h, grad_w)
    return (coef * nll).sum().to(acc_dtype(h.dtype)), stats


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss: RecallLoss, tp_group, dp_group, ignore_index, vocab_size,
                sequence_ids, chunk_size):
        h = hidden.reshape(-1, hidden.shape[-1])
        tokens = prepare_tokens(target, sequence_ids, ignore_index=ignore_index, vocab_size=vocab_size,
                                local_vocab=weight.shape[0], tp_group=tp_group)
        w = weight[:tokens.n_cols]  # padded vocabulary rows never enter the softmax
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = acc_dtype(h.dtype)
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        rows = chunk_rows(chunk_size, tokens.n_cols, len(tokens))
        # fp16 cannot hold unnormalised c-Div weights (e^{(alpha-1) l}) before the global 1/Z.
        schedule = _single_pass if loss.single_pass and h.dtype != torch.float16 else _two_pass
        local_loss, stats = schedule(h, w, tokens, loss, tp_group, dp_group, rows, grad_h, grad_w)
        ctx.grad_h = None if grad_h is None else grad_h.to(hidden.dtype).view(hidden.shape)
        ctx.grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(stats)
        return local_loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # e.g. gradient accumulation scaling
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, loss: RecallLoss, *,
                      tp_group=None, dp_group=None, ignore_index: int = -100, vocab_size: int | None = None,
                      chunk_size: int | None = None, sequence_ids: torch.Tensor | None = None) -> LossOutput:
    """Recall loss from hidden states and the output (lm_head) weight, fused and chunked.

    Args:
        hidden: ``[..., H]`` (e.g. ``[B, T, H]`` or ``[N, H]``) final hidden states, replicated over
            ``tp_group``.  Its gradient is this vocab shard's partial sum: under TP, sum it over
            ``tp_group`` (Megatron's column-parallel input does this in its backward).
        weight: ``[V/tp, H]`` this rank's contiguous vocabulary slice of the output weight.  Under
            ZeRO-3 / FSDP2 it must be the gathered (unsharded) parameter: call this inside the
            module's forward (see ``recall_dist.train``).
        target: ``[...]`` global token ids, same leading shape as ``hidden``; ``ignore_index`` excluded.
        loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids: as in ``vocab_parallel_loss``.
        chunk_size: tokens per chunk (default: ~4M logits per chunk).  Peak extra memory is
            O(chunk_size x V/tp + N x H): one fp32 logits chunk, the fp32 weight gradient, the hidden gradient.

    Returns ``LossOutput`` (``.loss``, ``.stats``).  ``.loss.backward()`` costs nothing extra: the
    gradients were formed in the forward pass.
    """
    check_shapes(hidden.shape[:-1], target.shape, "hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.numel() == 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, expected [V/tp, {hidden.shape[-1]}]; a 0-element "
            "weight is a ZeRO-3/FSDP shard: gather it (call the loss inside the head module's forward)")
    out, stats = _FusedLinearLoss.apply(hidden, weight, target, loss, tp_group, dp_group, ignore_index,
                                        vocab_size, sequence_ids, chunk_size)
    return LossOutput(out, stats, loss.rule.extra_stats())
