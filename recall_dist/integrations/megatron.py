"""Megatron-LM / megatron-core: the recall loss as the ``loss_func`` of a GPT ``forward_step``.

Two lines of Megatron-LM's ``pretrain_gpt.py`` change (README, "API"): the model runs without
labels, so ``GPTModel`` returns this rank's logits shard ``[b, s, V/tp]``, and the loss function is
``loss_func`` below, bound the Megatron way, ``partial(loss_func, loss_mask, labels=..., loss=...)``.
It takes the tensor- and data-parallel groups from ``megatron.core.parallel_state``.

What megatron-core 0.16.1 does with the returned ``(loss, num_tokens, report)`` (read in
``pipeline_parallel/schedules.py``, ``distributed/finalize_model_grads.py`` and
``distributed/distributed_data_parallel.py``), and why we return what we return:

- ``num_tokens`` must be an *integer* tensor: every schedule adds it into
  ``torch.zeros([], dtype=torch.int)``; a float (e.g. a sum of weights) raises there.
- By default (``calculate_per_token_loss=False``) each micro-batch's loss is divided by its
  ``num_tokens`` and by the number of micro-batches, and DDP averages gradients over DP ranks.
  With ``calculate_per_token_loss=True`` the loss is not divided, DDP *sums* over DP ranks, and
  ``finalize_model_grads`` divides every gradient by the total ``num_tokens`` of the step (over
  micro-batches and DP ranks): an integer, so it can normalise a token mean, never a sum of weights.
- Our ``loss`` is already normalised by Z, global over the DP group, and scaled by the DP size for
  gradient averaging; we return ``num_tokens = 1``, so in both modes the schedule's division only
  averages the micro-batches.  The gradient is then the mean over micro-batches of each
  micro-batch's objective (Z per micro-batch, global over DP).
- For Z over the *whole* step (README, "How the losses work"; what a single large batch gives),
  pass ``step=StepNormalizer(loss)`` and install ``step_finalize(step)`` as
  ``config.finalize_model_grads_func``: each micro-batch then backpropagates its unnormalised
  weighted sum and the gradients are rescaled once, after the DP reduction and before the optimizer
  (and its clipping) runs.
- ``report`` holds Megatron-LM's ``[numerator, denominator]`` pairs (the format of its own GPT
  loss): its ``train_step`` and ``evaluate`` sum them over micro-batches and all-reduce them over
  DP ranks, then divide.  Each rank contributes 1/dp of the DP-global values, so ``lm loss`` is
  the objective that the gradient follows, global over DP, and fresh tensors (the schedule divides
  the returned loss in place).

Padded vocabulary: Megatron pads V to a multiple of ``make-vocab-size-divisible-by x tp``; pass the
tokenizer's real ``vocab_size`` and the padded columns are masked (zero probability, zero
gradient), so the value differs from Megatron's own cross-entropy, which keeps them in its
softmax, by design.  Context parallelism is not supported (a rank would see pieces of sequences).
"""

from __future__ import annotations

import torch

from recall_dist.integrations.normalizer import StepNormalizer
from recall_dist.losses.base import RecallLoss
from recall_dist.parallel import LossOutput, fused_linear_loss, vocab_parallel_loss
from recall_dist.train.step_scale import scale_gradients_


def loss_func(
    loss_mask: torch.Tensor,
    output_tensor: torch.Tensor,
    *,
    labels: torch.Tensor,
    loss: RecallLoss,
    vocab_size: int | None = None,
    output_weight: torch.Tensor | None = None,
    step: StepNormalizer | None = None,
):
    """The recall loss of one micro-batch, in the form Megatron's schedules expect.

    Args:
        loss_mask: ``[b, s]``, 0 where a token is excluded (as Megatron's ``get_batch`` builds it).
        output_tensor: ``GPTModel(tokens, position_ids, attention_mask)`` without labels: the logits
            shard ``[b, s, V/tp]`` (vocab-parallel over the TP group); or, with ``output_weight``,
            the final hidden states ``[b, s, H]`` (see ``use_fused_output_layer``).
        labels: ``[b, s]`` global token ids (Megatron's ``labels``, already shifted).
        loss: a ``RecallLoss`` (``build_loss``).
        vocab_size: the tokenizer's real vocabulary when the model's is padded (padded columns masked).
        output_weight: this rank's output-layer weight shard ``[V/tp, H]``: the fused path, no logits.
            The hidden states' gradient is summed over the TP group here (what ``ColumnParallelLinear``
            does for its input), so it reaches the decoder complete.
        step: a ``StepNormalizer`` for Z over the whole optimizer step (with ``step_finalize``).

    Returns ``(loss, num_tokens, report)``: the tensor the schedule divides and backpropagates,
    ``num_tokens = 1`` (int), and ``{"lm loss": [num, den], "recall nll": ..., ...}`` pairs
    (module docstring).
    """
    from megatron.core import parallel_state as ps

    _check_layout(output_tensor, labels, output_weight)
    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("recall_dist loss_func: context parallelism (CP > 1) is not supported")
    if step is not None and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("recall_dist loss_func: step=StepNormalizer needs PP = 1 (its scale lives on the last stage)")
    groups = {"tp_group": ps.get_tensor_model_parallel_group(), "dp_group": ps.get_data_parallel_group()}
    if output_weight is None:
        out = vocab_parallel_loss(output_tensor, labels, loss, loss_mask=loss_mask, vocab_size=vocab_size, **groups)
    else:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(output_tensor)  # identity forward, TP all-reduce backward
        out = fused_linear_loss(
            hidden, output_weight, labels, loss, loss_mask=loss_mask, vocab_size=vocab_size, **groups
        )
    dp = ps.get_data_parallel_world_size()
    if step is not None and output_tensor.requires_grad:
        backprop = step.add(out.loss, out.stats)
    else:
        backprop = out.loss
    num_tokens = torch.ones((), dtype=torch.int, device=output_tensor.device)
    return backprop, num_tokens, _report(out, dp, step, output_tensor.device)


def _check_layout(output_tensor: torch.Tensor, labels: torch.Tensor, output_weight) -> None:
    lead = tuple(output_tensor.shape[:-1])
    if lead != tuple(labels.shape) and lead == tuple(labels.shape)[::-1]:
        raise ValueError(
            f"output_tensor is {tuple(output_tensor.shape)} and labels {tuple(labels.shape)}: pass the model "
            "output as GPTModel returns it without labels ([b, s, ...]); do not transpose it"
        )
    if output_weight is not None and output_weight.shape[-1] != output_tensor.shape[-1]:
        raise ValueError(
            f"output_weight is {tuple(output_weight.shape)} but output_tensor's last dim is {output_tensor.shape[-1]}: "
            "with output_weight the model must return hidden states (use_fused_output_layer)"
        )


def _report(out: LossOutput, dp: int, step: StepNormalizer | None, device) -> dict[str, torch.Tensor]:
    """Megatron-LM ``[numerator, denominator]`` pairs; each DP rank holds 1/dp of the global values."""
    s = out.stats
    d = step.normaliser(s) if step is not None else 1.0
    tokens = s["tokens"]
    pairs = {
        "lm loss": (s["loss"] * d, d),
        "recall nll": (s["nll"] * tokens, tokens),
        "recall weight mean": (s["weight_mean"] * tokens, tokens),
        "recall kept fraction": (s["kept_fraction"] * tokens, tokens),
    }
    if "tau" in s:
        pairs["recall tau"] = (s["tau"], 1.0)
    return {
        k: torch.tensor([num / dp, den / dp], dtype=torch.float32, device=device) for k, (num, den) in pairs.items()
    }


def step_finalize(step: StepNormalizer, finalize_fn=None):
    """``config.finalize_model_grads_func`` for ``loss_func(..., step=step)``: runs Megatron's own
    ``finalize_model_grads`` (or ``finalize_fn``: the DP reduction), then rescales the gradients by
    ``micro_batches x D_0 / D_step`` (the schedule divided each micro-batch by their number) so they
    are the gradient of the objective with Z over the whole step, and starts the next step."""
    if finalize_fn is None:
        from megatron.core.distributed import finalize_model_grads as finalize_fn

    def finalize(model, *args, **kwargs):
        finalize_fn(model, *args, **kwargs)
        if step.micro_batches == 0:
            raise RuntimeError("step_finalize: no micro-batch was recorded; pass step=... to loss_func")
        scale_gradients_(model if isinstance(model, list | tuple) else [model], step.micro_batches * step.grad_scale())
        step.reset()

    return finalize


def use_fused_output_layer(model) -> torch.nn.Parameter:
    """Let the loss own the output projection of a megatron-core ``GPTModel``.

    The output layer (a ``ColumnParallelLinear``) then returns its input, so the model's forward
    without labels gives the final hidden states ``[b, s, H]``; pass the returned weight shard
    ``[V/tp, H]`` (the shared embedding when they are tied) as ``loss_func(..., output_weight=...)``
    and no logits tensor is formed.  The weight stays a parameter of its layer (checkpoints,
    optimizer and DDP are unchanged).  Sequence parallelism is not supported here.
    """
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    layer = gpt.output_layer
    if getattr(layer, "sequence_parallel", False):
        raise ValueError("use_fused_output_layer: sequence parallelism is not supported; use the logits path")

    def hidden_passthrough(hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None

    layer.forward = hidden_passthrough
    return gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight
