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

from recall_dist.constants import IGNORE_INDEX
from recall_dist.distributed.collectives import group_size
from recall_dist.losses.base import RecallLoss
from recall_dist.parallel.common import (
    FusedHeadFunction,
    LossOutput,
    Tokens,
    acc_dtype,
    apply_loss_mask,
    check_shapes,
    chunk_partials,
    chunk_rows,
    finalize,
    finite_token_weights,
    global_coefficients,
    prepare_tokens,
    reduce_lse,
    reduce_max,
)
from recall_dist.parallel.matmul import addmm_, mm
from recall_dist.parallel.options import KernelOptions
from recall_dist.parallel.triton_head import triton_fused_linear_loss, use_triton


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return mm(h, w.t(), acc_dtype(h.dtype))


def _subtract_at_target(p: torch.Tensor, target: torch.Tensor, in_shard: torch.Tensor, value: torch.Tensor) -> None:
    """p[n, target_n] -= value_n where the target is in this shard (a scatter: no host sync)."""
    p.scatter_add_(1, target.unsqueeze(1), torch.where(in_shard, -value.to(p.dtype), 0.0).unsqueeze(1))


class _Grads:
    """Gradient accumulators: dL/dh rows written once per token, dL/dW summed over chunks in fp32."""

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, n_cols: int, need_h: bool, need_w: bool):
        acc = acc_dtype(h.dtype)
        self.h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None
        self.n_cols = n_cols

    @property
    def needed(self) -> bool:
        return self.h is not None or self.w is not None

    def add(self, p: torch.Tensor, hc: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        """Add the chunk's logit gradient ``p`` [c, n_cols] (acc dtype) for hidden rows ``hc``."""
        g = p.to(hc.dtype)
        if self.h is not None:
            self.h.index_copy_(0, idx, mm(g, w, self.h.dtype))
        if self.w is not None:
            addmm_(self.w[: self.n_cols], g.t(), hc)

    def finish(self, scale: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scale both gradients (``None``: the step is skipped, gradients are zero)."""
        for g in (self.h, self.w):
            if g is not None:
                g.zero_() if scale is None else g.mul_(scale.to(g.dtype))
        return self.h, self.w


def _single_pass(h, w, tokens: Tokens, loss: RecallLoss, tp_group, dp_group, rows, grads: _Grads):
    nlls, weights, finites = [], [], []
    for i in range(0, len(tokens), rows):
        sl = slice(i, i + rows)
        idx, target, in_shard = tokens.index[sl], tokens.local_target[sl], tokens.in_shard[sl]
        hc = h.index_select(0, idx)
        z = _logits(hc, w)
        m, s, zt = chunk_partials(z, target, in_shard, inplace=True)  # z now holds exp(z - local max)
        lse, zt = reduce_lse(reduce_max(m, tp_group), m, s, zt, tp_group)
        nll, wt, finite = finite_token_weights(loss, lse - zt, dp_group)
        # w * softmax in one pass: exp(z - m) * w * exp(m - lse); then -w at the target
        w_chunk = wt.to(z.dtype)
        p = z.mul_((w_chunk * torch.exp(m - lse)).unsqueeze(1))
        _subtract_at_target(p, target, in_shard, w_chunk)
        grads.add(p, hc, idx, w)
        nlls.append(nll), weights.append(wt), finites.append(finite)
        del z, p  # before the next chunk's logits exist: one chunk alive at a time, as plan counts
    empty = torch.zeros(0, dtype=torch.float64, device=h.device)
    nll = torch.cat(nlls) if nlls else empty
    wt = torch.cat(weights) if weights else empty
    finite = torch.cat(finites) if finites else empty.bool()
    a, _b, stats = finalize(loss, nll, wt, finite, dp_group)
    scale = a * group_size(dp_group)  # b == 0 in this schedule
    skipped = bool(stats[-1] > 0)  # a non-finite token anywhere: its NaN already reached the sums
    return (scale * (wt * nll).sum()).to(acc_dtype(h.dtype)), stats, grads.finish(None if skipped else scale)


def _two_pass(h, w, tokens: Tokens, loss: RecallLoss, tp_group, dp_group, rows, grads: _Grads):
    parts = [
        chunk_partials(
            _logits(h.index_select(0, tokens.index[i : i + rows]), w),
            tokens.local_target[i : i + rows],
            tokens.in_shard[i : i + rows],
            inplace=True,
        )
        for i in range(0, len(tokens), rows)
    ]
    lse, nll, coef, stats = global_coefficients(loss, tokens, parts, tp_group, dp_group, acc_dtype(h.dtype), h.device)
    if grads.needed:
        keep = (coef > 0).nonzero().squeeze(1)  # truncated tokens cost no second pass
        shift = lse.to(torch.float64) - torch.log(coef.clamp_min(1e-300))
        for i in range(0, keep.numel(), rows):
            k = keep[i : i + rows]
            idx, target, in_shard = tokens.index[k], tokens.local_target[k], tokens.in_shard[k]
            hc = h.index_select(0, idx)
            # coef * softmax in one pass: exp(z - (lse - log coef)); then -coef at the target
            p = _logits(hc, w).sub_(shift[k].to(lse.dtype).unsqueeze(1)).exp_()
            _subtract_at_target(p, target, in_shard, coef[k])
            grads.add(p, hc, idx, w)
            del p  # one logits chunk alive at a time
    return (coef * nll).sum().to(acc_dtype(h.dtype)), stats, grads.finish(torch.ones((), dtype=torch.float64))


class _FusedLinearLoss(FusedHeadFunction):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        loss: RecallLoss,
        tp_group,
        dp_group,
        ignore_index,
        vocab_size,
        sequence_ids,
        chunk_size,
    ):
        h = hidden.reshape(-1, hidden.shape[-1])
        tokens = prepare_tokens(
            target,
            sequence_ids,
            ignore_index=ignore_index,
            vocab_size=vocab_size,
            local_vocab=weight.shape[0],
            tp_group=tp_group,
        )
        w = weight[: tokens.n_cols]  # padded vocabulary rows never enter the softmax
        grads = _Grads(h, weight, tokens.n_cols, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        rows = chunk_rows(chunk_size, tokens.n_cols, len(tokens), h.shape[1])
        # fp16 cannot hold unnormalised c-Div weights (e^{(alpha-1) l}) before the global 1/Z.
        schedule = _single_pass if loss.single_pass and h.dtype != torch.float16 else _two_pass
        local_loss, stats, (grad_h, grad_w) = schedule(h, w, tokens, loss, tp_group, dp_group, rows, grads)
        ctx.grad_h = None if grad_h is None else grad_h.to(hidden.dtype).view(hidden.shape)
        ctx.grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        ctx.mark_non_differentiable(stats)
        return local_loss, stats


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss: RecallLoss,
    *,
    tp_group=None,
    dp_group=None,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    sequence_ids: torch.Tensor | None = None,
    kernel: str | KernelOptions | None = None,
) -> LossOutput:
    """Recall loss from hidden states and the output (lm_head) weight, fused and chunked.

    Args:
        hidden: ``[..., H]`` (e.g. ``[B, T, H]`` or ``[N, H]``) final hidden states, replicated over
            ``tp_group``.  Its gradient is this vocab shard's partial sum: under TP, sum it over
            ``tp_group`` (Megatron's column-parallel input does this in its backward).
        weight: ``[V/tp, H]`` this rank's contiguous vocabulary slice of the output weight.  Under
            ZeRO-3 / FSDP2 it must be the gathered (unsharded) parameter: call this inside the
            module's forward (see ``recall_dist.train``).
        target: ``[...]`` global token ids, same leading shape as ``hidden``; ``ignore_index`` excluded.
        loss, tp_group, dp_group, ignore_index, loss_mask, vocab_size, sequence_ids: as in ``vocab_parallel_loss``.
        chunk_size: tokens per chunk (default: ~4M logits per chunk).  Peak extra memory is
            O(chunk_size x V/tp + N x H): one fp32 logits chunk, the fp32 weight gradient, the hidden gradient.
        kernel: how it runs (``docs/kernels.md``), a ``KernelOptions`` used as given (the training loss
            head passes the config's, merged with the environment), or just the kernel's name: ``auto``
            (the default, or ``$RECALL_DIST_KERNEL``) takes the Triton kernels of ``triton_head.py`` for
            CUDA tensors when ``triton`` is installed, this PyTorch implementation otherwise; ``torch`` or
            ``triton`` force one (the Triton head's schedule, matmul engine and tiles then come from
            ``$RECALL_DIST_HEAD_SCHEDULE``, ``$RECALL_DIST_HEAD_MATMUL``, ``$RECALL_DIST_TRITON_TILES``).

    Returns ``LossOutput`` (``.loss``, ``.stats``).  ``.loss.backward()`` costs nothing extra: the
    gradients were formed in the forward pass.
    """
    check_shapes(hidden.shape[:-1], target.shape, "hidden")
    target = apply_loss_mask(target, loss_mask, ignore_index)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.numel() == 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, expected [V/tp, {hidden.shape[-1]}]; a 0-element "
            "weight is a ZeRO-3/FSDP shard: gather it (call the loss inside the head module's forward)"
        )
    options = KernelOptions.resolve(kernel)
    if use_triton(hidden, options.kernel):
        return triton_fused_linear_loss(
            hidden, weight, target, loss, tp_group=tp_group, dp_group=dp_group, ignore_index=ignore_index,
            vocab_size=vocab_size, chunk_size=chunk_size, sequence_ids=sequence_ids, options=options,
        )  # fmt: skip
    out, stats = _FusedLinearLoss.apply(
        hidden, weight, target, loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids, chunk_size
    )
    return LossOutput(out, stats, loss.rule.extra_stats())
