"""``vocab_parallel_loss``: the recall loss from a local logits shard (Megatron's output layer with
``parallel_output=True``), vocabulary-parallel over ``tp_group`` and normalised over ``dp_group``.

Forward reads the logits chunk by chunk (never an fp32 copy of the whole shard), reduces three
numbers per token over the TP group, weights the tokens and all-reduces the normaliser over DP.
Backward recomputes softmax chunk by chunk from the saved logits and the global log-sum-exp: no
communication.
"""

from __future__ import annotations

import torch

from recall_dist.constants import IGNORE_INDEX
from recall_dist.losses.base import RecallLoss
from recall_dist.parallel.common import (
    LossOutput,
    acc_dtype,
    apply_loss_mask,
    check_shapes,
    chunk_partials,
    chunk_rows,
    global_coefficients,
    prepare_tokens,
)
from recall_dist.parallel.options import KernelOptions
from recall_dist.parallel.triton_head import triton_vocab_parallel_loss, use_triton


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, loss: RecallLoss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids, chunk_size
    ):
        local_vocab = logits.shape[-1]
        x = logits.reshape(-1, local_vocab)
        tokens = prepare_tokens(
            target,
            sequence_ids,
            ignore_index=ignore_index,
            vocab_size=vocab_size,
            local_vocab=local_vocab,
            tp_group=tp_group,
        )
        rows = chunk_rows(chunk_size, tokens.n_cols, len(tokens))
        parts = [
            chunk_partials(
                x.index_select(0, tokens.index[i : i + rows])[:, : tokens.n_cols],
                tokens.local_target[i : i + rows],
                tokens.in_shard[i : i + rows],
            )
            for i in range(0, len(tokens), rows)
        ]
        lse, nll, coef, stats = global_coefficients(
            loss, tokens, parts, tp_group, dp_group, acc_dtype(x.dtype), x.device
        )
        local_loss = (coef * nll).sum().to(acc_dtype(x.dtype))
        ctx.save_for_backward(logits, tokens.index, tokens.local_target, tokens.in_shard, lse, coef.to(lse.dtype))
        ctx.meta = (tokens.n_cols, rows)
        ctx.mark_non_differentiable(stats)
        return local_loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, index, local_target, in_shard, lse, coef = ctx.saved_tensors
        n_cols, rows = ctx.meta
        x = logits.reshape(-1, logits.shape[-1])
        grad = torch.zeros_like(x)
        keep = coef != 0  # truncated or skipped tokens have exactly zero gradient: skip their rows
        index, local_target, in_shard, lse, coef = (t[keep] for t in (index, local_target, in_shard, lse, coef))
        scale = coef * grad_loss.to(coef.dtype)
        for i in range(0, index.numel(), rows):
            sl = slice(i, i + rows)
            p = torch.exp(x.index_select(0, index[sl])[:, :n_cols].to(lse.dtype) - lse[sl].unsqueeze(1))
            p.scatter_add_(1, local_target[sl].unsqueeze(1), -in_shard[sl].to(p.dtype).unsqueeze(1))
            p.mul_(scale[sl].unsqueeze(1))
            grad[index[sl], :n_cols] = p.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None, None, None


def vocab_parallel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss: RecallLoss,
    *,
    tp_group=None,
    dp_group=None,
    ignore_index: int = IGNORE_INDEX,
    loss_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    sequence_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    kernel: str | KernelOptions | None = None,
) -> LossOutput:
    """Recall loss from vocabulary-parallel logits.

    Args:
        logits: ``[..., V/tp]`` (e.g. ``[B, T, V/tp]`` or ``[N, V/tp]``), any float dtype; this rank's
            contiguous vocabulary slice ``[r*V/tp, (r+1)*V/tp)`` of the (possibly padded) vocabulary,
            sharded over ``tp_group``.
        target: ``[...]`` global token ids (not shard-local), same leading shape as ``logits``;
            ``ignore_index`` marks tokens excluded from everything (weights, quantiles, counts).
        loss_mask: optional ``[...]`` like ``target`` (Megatron's ``loss_mask``): a 0 excludes the
            token exactly like ``ignore_index``.
        loss: a ``RecallLoss`` from ``build_loss``.
        tp_group: tensor-parallel group the vocabulary is sharded over (``None``: full vocabulary).
        dp_group: data-parallel group; the normaliser Z, the statistics and the truncation buffer
            are global over it, and each rank's ``.loss`` is scaled by its size so that the mean over
            ranks of losses and gradients equals the global objective (``None``: not distributed).
        vocab_size: real vocabulary size when the vocabulary is padded to ``V/tp * tp``; padded
            columns are masked (zero probability, zero gradient). Default: no padding.
        sequence_ids: ``[...]`` like ``target``; tokens with equal id form one sequence (packing).
            Default: each row of a ``[B, T]`` target is a sequence; a 1-D target has none (sequence-level
            truncation then raises).
        chunk_size: tokens per fp32 chunk (default: ~4M logits per chunk).
        kernel: a ``KernelOptions`` (only its ``kernel`` matters here; ``docs/kernels.md``) or the kernel's
            name: ``auto`` (the default, or ``$RECALL_DIST_KERNEL``): Triton kernels for CUDA logits when
            ``triton`` is installed (one read of each row forward, one read and one write backward),
            this PyTorch implementation otherwise; ``torch`` or ``triton`` force one.

    Returns:
        ``LossOutput`` with ``.loss`` (scalar; call ``backward``) and ``.stats`` (global step statistics).

    Raises ``ValueError`` when a target id lies outside ``[0, vocab_size)``.  Non-finite logits of a
    valid token skip the step on every rank (loss 0, zero gradients, ``stats["nonfinite_tokens"]``).
    """
    check_shapes(logits.shape[:-1], target.shape, "logits")
    target = apply_loss_mask(target, loss_mask, ignore_index)
    if use_triton(logits, KernelOptions.resolve(kernel).kernel):
        return triton_vocab_parallel_loss(
            logits, target, loss, tp_group=tp_group, dp_group=dp_group, ignore_index=ignore_index,
            vocab_size=vocab_size, sequence_ids=sequence_ids,
        )  # fmt: skip
    out, stats = _VocabParallelLoss.apply(
        logits, target, loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids, chunk_size
    )
    return LossOutput(out, stats, loss.rule.extra_stats())
