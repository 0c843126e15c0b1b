"""Shared pieces of the two loss kernels: target preparation (ignore_index, shard ranges, padded
vocabulary), the O(1)-per-token TP reduction of the log-sum-exp, and the global (DP) statistics
that turn rule weights into per-token coefficients.

Statistics are fp32 per element and float64 per token: bf16 inputs never meet a bf16 reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recall_dist.distributed.collectives import all_reduce_, group_rank, group_size
from recall_dist.losses.accumulator import STAT_NAMES
from recall_dist.losses.base import RecallLoss, TokenBatch

# One fp32 chunk of logits holds about this many elements (16 MiB): small next to an N x V tensor,
# large enough that the chunk's matmul runs at full speed.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class Tokens:
    """The valid (non-ignored) tokens of a flattened batch, as this vocab shard sees them."""

    index: torch.Tensor  # [n] long: row of each valid token in the flattened batch
    local_target: torch.Tensor  # [n] long: target column within this shard (0 where not in shard)
    in_shard: torch.Tensor  # [n] bool: the target lies in this shard
    sequence_ids: torch.Tensor | None  # [n] long or None
    n_cols: int  # real (unpadded) vocabulary columns held by this shard

    def __len__(self) -> int:
        return self.index.numel()


def prepare_tokens(
    target: torch.Tensor,
    sequence_ids: torch.Tensor | None,
    *,
    ignore_index: int,
    vocab_size: int | None,
    local_vocab: int,
    tp_group,
) -> Tokens:
    """Validate targets and locate them in this rank's contiguous vocab slice [r*V/tp, (r+1)*V/tp)."""
    tp, rank = group_size(tp_group), group_rank(tp_group)
    padded_vocab = local_vocab * tp
    vocab_size = padded_vocab if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {padded_vocab}] (local shard {local_vocab} x tp {tp})"
        )
    if sequence_ids is None and target.dim() >= 2:  # rows of a [batch, seq] target are sequences
        rows = torch.arange(target[..., 0].numel(), device=target.device)
        sequence_ids = rows.view(target.shape[:-1]).unsqueeze(-1).expand(target.shape)
    flat = target.reshape(-1)
    if sequence_ids is not None and sequence_ids.numel() != flat.numel():
        raise ValueError(f"sequence_ids has {sequence_ids.numel()} elements, target {flat.numel()}")
    # ignore_index (-100) lies outside every shard: test it before any range test.
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab_size))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target id {int(flat[pos])} at position {pos} is outside the vocabulary "
            f"[0, {vocab_size}) (ignore_index={ignore_index})"
        )
    index = valid.nonzero().squeeze(1)
    local = flat[index] - rank * local_vocab
    in_shard = (local >= 0) & (local < local_vocab)
    n_cols = max(0, min(local_vocab, vocab_size - rank * local_vocab))
    seq = sequence_ids.reshape(-1)[index].long() if sequence_ids is not None else None
    return Tokens(index, torch.where(in_shard, local, torch.zeros_like(local)), in_shard, seq, n_cols)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype: fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def check_shapes(lead: torch.Size, target: torch.Size, what: str) -> None:
    if tuple(lead) != tuple(target):
        raise ValueError(f"{what} leading shape {tuple(lead)} does not match target shape {tuple(target)}")


def apply_loss_mask(target: torch.Tensor, loss_mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """``target`` with ``ignore_index`` wherever ``loss_mask`` is 0 (Megatron's ``loss_mask``), so a
    masked token is excluded exactly like an ignored one: from weights, quantiles, counts and id checks."""
    if loss_mask is None:
        return target
    if tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} does not match target shape {tuple(target.shape)}")
    return target.masked_fill(loss_mask.to(target.device) == 0, ignore_index)


# Upper bound of the default chunk: 64M logits (256 MiB in fp32).
MAX_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(chunk_size: int | None, n_cols: int, n_tokens: int, hidden_size: int = 0) -> int:
    """Tokens per chunk.  Default: a logits chunk of 1/8 of the whole N x V/tp logits, capped at
    ``MAX_CHUNK_ELEMENTS`` and at least max(N x H, ``DEFAULT_CHUNK_ELEMENTS``).  Fewer, larger chunks
    matter: every chunk re-reads the whole weight shard and updates the whole fp32 weight gradient
    (memory-bound on CPUs), while 1/8 of the logits stays far below what materialised logits cost."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    budget = max(DEFAULT_CHUNK_ELEMENTS, n_tokens * hidden_size, min(n_tokens * n_cols // 8, MAX_CHUNK_ELEMENTS))
    return max(16, min(max(n_tokens, 1), budget // max(n_cols, 1)))


def chunk_partials(logits: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor, *, inplace: bool = False):
    """Per-row (local max, sum of exp(x - max), target logit or 0 where not in this shard).

    ``logits`` [c, n_cols] is any dtype, read into the accumulation dtype.  ``inplace=True`` lets a
    freshly computed fp32 chunk be overwritten with exp(x - max) instead of allocating a copy.
    """
    acc = acc_dtype(logits.dtype)
    if logits.shape[1] == 0:  # a shard made only of vocabulary padding
        zeros = torch.zeros(logits.shape[0], dtype=acc, device=logits.device)
        return torch.full_like(zeros, -math.inf), zeros, zeros
    x = logits.to(acc)
    m = x.max(dim=1).values
    zt = torch.where(in_shard, x.gather(1, local_target.unsqueeze(1)).squeeze(1), 0.0)
    shifted = x.sub_(m.unsqueeze(1)).exp_() if inplace and x is logits else torch.exp(x - m.unsqueeze(1))
    return m, shifted.sum(dim=1), zt


def reduce_max(m_local: torch.Tensor, tp_group) -> torch.Tensor:
    return all_reduce_(m_local.clone(), "max", tp_group)


def reduce_lse(
    m_global: torch.Tensor, m_local: torch.Tensor, s_local: torch.Tensor, target_logit: torch.Tensor, tp_group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global log-sum-exp and target logit: one SUM of 2 numbers per token over the TP group."""
    rescale = torch.where(torch.isneginf(m_local), torch.zeros_like(m_local), torch.exp(m_local - m_global))
    packed = torch.stack([s_local * rescale, target_logit])
    all_reduce_(packed, "sum", tp_group)
    return m_global + torch.log(packed[0]), packed[1]


def finalize(
    loss: RecallLoss, nll: torch.Tensor, weights: torch.Tensor, finite: torch.Tensor, dp_group
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global sums over the DP group -> (A, B, stats): this call's gradient is that of
    sum_n (A w_n + B) l_n (``RecallLoss.coefficients``; inside an optimizer step, the step's scale).

    ``nll``/``weights`` are float64 [n] with non-finite tokens already zeroed (``finite`` False).
    Any non-finite token anywhere skips the step on every rank: A = B = 0, ``nonfinite_tokens``
    reports the global count and ``loss``/``nll`` are nan (documented skip; raising on one rank would
    deadlock the others).
    """
    div = loss.rule.divergence(nll)
    div = torch.zeros_like(nll) if div is None else torch.where(finite, div, torch.zeros_like(div))
    sums = torch.stack(  # in the order of recall_dist.losses.accumulator.SUM_NAMES
        [
            weights.sum(),
            finite.sum().to(torch.float64),
            (weights * nll).sum(),
            nll.sum(),
            (weights * weights).sum(),
            (weights > 0).sum().to(torch.float64),
            div.sum(),
            (~finite).sum().to(torch.float64),
        ]
    )
    all_reduce_(sums, "sum", dp_group)
    wmax = all_reduce_(
        weights.max().reshape(1) if weights.numel() else torch.zeros(1, dtype=torch.float64, device=nll.device),
        "max",
        dp_group,
    )[0]
    a, b = loss.coefficients(sums[0], sums[1])
    skip = sums[-1] > 0
    a, b = torch.where(skip, torch.zeros_like(a), a), torch.where(skip, torch.zeros_like(b), b)
    return a, b, loss.summarize(sums, wmax, weights * nll)


def finite_token_weights(
    loss: RecallLoss, nll: torch.Tensor, dp_group, sequence_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (nll, weights, finite) for a set of tokens: the loss's ``clipped_weights`` of the finite
    NLLs; a non-finite token gets NLL 0 and weight 0 (``finite`` marks which, so the step can be skipped)."""
    nll = nll.to(torch.float64)
    finite = torch.isfinite(nll)
    nll = torch.where(finite, nll, torch.zeros_like(nll))
    w = loss.clipped_weights(TokenBatch(nll, sequence_ids, dp_group))
    return nll, torch.where(finite, w, torch.zeros_like(w)), finite


def global_coefficients(
    loss: RecallLoss, tokens: Tokens, parts: list, tp_group, dp_group, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-chunk ``chunk_partials`` of every valid token: the global log-sum-exp (TP), the rule's
    weights of the whole local batch, the DP-global normaliser.  Returns (lse, nll, coef, stats) with
    objective = sum_n coef_n nll_n / dp_size; ``coef`` is scaled by the DP size so that averaging the
    ranks' gradients (DDP/ZeRO/FSDP) yields the gradient of the global objective."""
    empty = torch.zeros(0, dtype=dtype, device=device)
    m, s, zt = (torch.cat(p) for p in zip(*parts, strict=False)) if parts else (empty, empty, empty)
    lse, zt = reduce_lse(reduce_max(m, tp_group), m, s, zt, tp_group)
    nll, w, finite = finite_token_weights(loss, lse - zt, dp_group, tokens.sequence_ids)
    a, b, stats = finalize(loss, nll, w, finite, dp_group)
    return lse, nll, (a * w + b) * group_size(dp_group), stats


class LossOutput:
    """Result of a loss call: ``.loss`` (scalar tensor for ``backward``) and ``.stats``.

    ``.stats`` is a dict of floats for the *global* step (all DP ranks): loss (objective value),
    nll (mean token NLL), weight_mean, weight_max, ess ((sum w)^2 / sum w^2), kept_fraction
    (tokens with w > 0), tokens (global valid count), divergence (mean per-token divergence of the
    rule, = nll for nll), nonfinite_tokens (> 0: the step was skipped, loss 0, zero gradients),
    and rule extras such as tau.  It is read from the device lazily, on first access.
    """

    def __init__(self, loss: torch.Tensor, stats: torch.Tensor, extra: dict[str, float]):
        self.loss = loss
        self._stats_tensor = stats
        self._extra = extra
        self._stats: dict[str, float] | None = None

    @property
    def stats(self) -> dict[str, float]:
        if self._stats is None:
            values = self._stats_tensor.detach().cpu().tolist()
            self._stats = dict(zip(STAT_NAMES, values, strict=False)) | self._extra
        return self._stats

    def __repr__(self) -> str:
        return f"LossOutput(loss={self.loss!r}, stats={self.stats})"


class FusedHeadFunction(torch.autograd.Function):
    """Base of the fused-head autograd functions (PyTorch and Triton paths): forward forms the
    gradients of ``hidden`` and ``weight`` (its first two inputs; the others get none) and leaves them in
    ``ctx.grad_h`` / ``ctx.grad_w``; backward hands them out, scaled when the incoming gradient is not
    1 (gradient accumulation, a loss scale)."""

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, *[None] * (len(ctx.needs_input_grad) - 2)
