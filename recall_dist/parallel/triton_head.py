"""The CUDA path of both entry points: Triton kernels for the per-token statistics and the logit
gradients (``triton_ops.py``, ``triton_kernels.py``), cuBLAS for the dW / dH GEMMs, and the same rule
seam, TP reduction and DP normaliser as the PyTorch path (``common.global_coefficients``).

``fused_linear_loss`` on CUDA (``kernel="auto"``) runs:

1. ``head_statistics``: per token, (max, sum-exp, target logit) of this vocabulary shard, block by
   block: no ``N x V/tp`` logits tensor.
2. ``global_coefficients``: the TP reduction of those three numbers, the rule's weights of the
   detached NLL, the global normaliser Z over DP: one coefficient per token.  The kernels never
   learn which rule runs.
3. ``head_gradients``, only for tokens with a non-zero coefficient (truncated tokens cost nothing):
   vocabulary chunk by chunk, the logits are recomputed and ``coef * (softmax - onehot)`` written in
   the input dtype, then ``dW[chunk] = d^T @ h`` (each chunk complete in one GEMM, accumulated in fp32
   over all tokens) and ``dH += d @ W[chunk]`` (an fp32 accumulator).

That is 8 N H V/tp flops (statistics, then recompute and two GEMMs) against 6 for plain
cross-entropy, bought for an exact fp32 dW without a V x H fp32 accumulator.  As in the PyTorch path
the gradients are formed in the forward pass, so the backward never needs the (FSDP2 / ZeRO-3
gathered) weight again.  ``head_schedule="single"`` trades that for 6 N H V/tp flops and an
fp32 dW accumulator (``triton_single.py``).  The PyTorch path stays the CPU implementation and the
reference.  Every choice (kernel, schedule, matmul engine, tiles) arrives in a ``KernelOptions``
(``options.py``; ``docs/kernels.md``): the loss config's keys, overridden by ``RECALL_DIST_*``.
"""

from __future__ import annotations

import importlib.util

import torch

from recall_dist.losses.base import RecallLoss
from recall_dist.parallel.common import FusedHeadFunction, LossOutput, global_coefficients, prepare_tokens
from recall_dist.parallel.options import KERNELS, KernelOptionError, KernelOptions
from recall_dist.parallel.triton_ops import (
    default_tiles,
    head_gradients,
    head_statistics,
    logits_gradient,
    logits_statistics,
)
from recall_dist.parallel.triton_single import single_pass_head

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreted() -> bool:
    """Whether the kernels were decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from recall_dist.parallel.triton_kernels import INTERPRET

    return INTERPRET


def use_triton(tensor: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether the loss on ``tensor`` runs the Triton path, for the ``kernel`` choice
    (``KernelOptions.kernel``): ``auto`` takes Triton for CUDA tensors in bf16/fp16/fp32 when ``triton``
    is importable; ``torch`` forces the PyTorch path; ``triton`` insists (an error says why it cannot run;
    CPU tensors only under ``TRITON_INTERPRET=1``).
    """
    choice = kernel
    if choice not in KERNELS:
        raise KernelOptionError("kernel", choice, ", ".join(KERNELS))
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


class _TritonFusedLinear(FusedHeadFunction):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss, tp_group, dp_group, ignore_index, vocab_size, seq_ids, chunk, opts):
        h = hidden.reshape(-1, hidden.shape[-1])
        h = h if h.stride(1) == 1 else h.contiguous()
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        tokens, target_col = _tokens(target, seq_ids, ignore_index, vocab_size, w.shape[0], tp_group)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # fp16 cannot hold unnormalised c-Div weights (e^{(alpha-1) l}) before the global 1/Z
        if opts.head_schedule == "single" and loss.single_pass and h.dtype != torch.float16:
            local_loss, stats, grad_h, grad_w = single_pass_head(
                h, w, tokens, target_col, loss, tp_group, dp_group, chunk_size=chunk, need_h=need_h, need_w=need_w
            )
            return _TritonFusedLinear._keep(ctx, hidden, grad_h, grad_w, stats, local_loss)
        tiles, engine = default_tiles(h.dtype, opts.triton_tiles), opts.head_matmul
        stats_of = head_statistics(h, w, tokens.index, target_col, tokens.n_cols, tiles, chunk, engine)
        parts = [stats_of] if len(tokens) else []
        lse, nll, coef, stats = global_coefficients(loss, tokens, parts, tp_group, dp_group, torch.float32, h.device)
        grad_h = grad_w = None
        if need_h or need_w:
            grad_h, grad_w = head_gradients(
                h, w, tokens.index, target_col, lse, coef, tokens.n_cols, need_h=need_h, need_w=need_w,
                chunk_size=chunk, tiles=tiles, engine=engine,
            )  # fmt: skip
        return _TritonFusedLinear._keep(ctx, hidden, grad_h, grad_w, stats, (coef * nll).sum().to(torch.float32))

    @staticmethod
    def _keep(ctx, hidden, grad_h, grad_w, stats, local_loss):
        """Gradients formed in forward wait in ``ctx`` for backward."""
        ctx.grad_h = None if grad_h is None else grad_h.view(hidden.shape)
        ctx.grad_w = grad_w
        ctx.mark_non_differentiable(stats)
        return local_loss, stats


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
    hidden,
    weight,
    target,
    loss: RecallLoss,
    *,
    tp_group,
    dp_group,
    ignore_index,
    vocab_size,
    chunk_size,
    sequence_ids,
    options: KernelOptions,
) -> LossOutput:
    """``fused_linear_loss`` on the Triton path (same arguments, checked by the caller; ``options``
    resolved by it: the schedule, matmul engine and tiles)."""
    out, stats = _TritonFusedLinear.apply(
        hidden, weight, target, loss, tp_group, dp_group, ignore_index, vocab_size, sequence_ids, chunk_size, options
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
