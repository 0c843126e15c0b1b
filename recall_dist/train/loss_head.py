"""The loss owns the output layer: ``CausalLMWithLossHead`` runs the decoder to hidden states and
``LossHead`` does the lm_head matmul inside the fused loss, so no N x V logits exist in training.

Why a module and not a function call after ``model(...)``:
- FSDP2 reshards parameters after a module's forward; a head that reads ``lm_head.weight`` outside
  a forward sees a DTensor shard (torchtune #2800).  Here the whole loss runs inside the root
  module's forward, where the root's parameters (embeddings, final norm, lm_head) are unsharded,
  and the backward re-gathers them through FSDP's pre-backward hook on the returned loss.
- ZeRO-3 gathers a module's own parameters around its forward; the head weight belongs to
  ``lm_head`` (or, tied, to ``embed_tokens``), whose forward never runs, so it would be numel-0
  (TRL #3368).  ``register_zero3_head`` registers it as an external parameter of ``LossHead``, which
  makes ZeRO-3 gather it for ``LossHead``'s forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from recall_dist import fused_linear_loss
from recall_dist.constants import IGNORE_INDEX
from recall_dist.parallel.options import KernelOptions
from recall_dist.train.lora import head_adapter, widen_for_head_adapter
from recall_dist.train.models import decoder_of


class LossHead(nn.Module):
    """``forward(hidden [B, T, H], labels [B, T], sequence_ids [B, T] | None) -> (loss, stats)``.

    ``labels`` are aligned with the input ids (-100 where no loss); the shift happens here:
    ``hidden[:, :-1]`` predicts ``labels[:, 1:]``.  ``loss`` is this rank's share of the global
    objective (``dp_group`` all-reduces the normaliser Z over the whole step), so DDP-style gradient
    averaging gives the gradient of the global objective.  The head weight is looked up through
    ``weight_owner`` at call time (it is not registered here: one parameter, one owner).  ``kernel``
    (``KernelOptions``; ``None``: the built-in defaults) is passed to the kernel as it is: whoever builds
    the head has resolved the ``RECALL_DIST_*`` overrides once, at its start (the trainer through
    ``TrainConfig.with_environment``, the Hugging Face integration when it is constructed), and the
    forward never reads the environment (``docs/kernels.md``).
    """

    def __init__(
        self,
        weight_owner: nn.Module,
        loss,
        dp_group=None,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        kernel: KernelOptions | None = None,
    ):
        super().__init__()
        self._weight_owner = [weight_owner]  # a list hides it from nn.Module registration
        self.loss = loss
        self.dp_group = dp_group
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.kernel = kernel if kernel is not None else KernelOptions()

    @property
    def weight(self) -> torch.Tensor:
        return self._weight_owner[0].weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None):
        target = labels[:, 1:]
        seq = sequence_ids[:, 1:] if sequence_ids is not None else None
        # Evaluation runs under no_grad, but the fused head forms its gradients in the forward pass
        # whenever an input requires grad (a parameter always does): a detached weight skips that work.
        weight = self.weight if torch.is_grad_enabled() else self.weight.detach()
        hidden = hidden[:, :-1]
        adapter = head_adapter(self._weight_owner[0])
        if adapter is not None:  # lm_head in model.lora.target_modules: [W, B] [x; s A drop(x)] (train/lora.py)
            hidden, weight = widen_for_head_adapter(hidden, weight, adapter)
        out = fused_linear_loss(
            hidden,
            weight,
            target,
            self.loss,
            dp_group=self.dp_group,
            ignore_index=IGNORE_INDEX,
            vocab_size=self.vocab_size,
            chunk_size=self.chunk_size,
            sequence_ids=seq,
            kernel=self.kernel,
        )
        return out.loss, out.stats


class CausalLMWithLossHead(nn.Module):
    """A Hugging Face causal LM whose forward returns ``(loss, stats)`` from hidden states.

    ``self.model`` is the untouched ``*ForCausalLM`` (its state dict is what gets exported);
    ``self.loss_head`` has no parameters of its own.
    """

    def __init__(
        self, model: nn.Module, loss, dp_group=None, chunk_size: int | None = None, kernel: KernelOptions | None = None
    ):
        super().__init__()
        self.model = model
        self.loss_head = LossHead(
            model.get_output_embeddings(),
            loss,
            dp_group,
            vocab_size=model.config.vocab_size,
            chunk_size=chunk_size,
            kernel=kernel,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        hidden = decoder_of(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.loss_head(hidden, labels, sequence_ids)


def register_zero3_head(wrapper: CausalLMWithLossHead) -> None:
    """Under ZeRO-3, make ``LossHead``'s forward gather the (possibly tied) head weight."""
    import deepspeed

    deepspeed.zero.register_external_parameter(wrapper.loss_head, wrapper.loss_head.weight)
    adapter = head_adapter(wrapper.loss_head._weight_owner[0])
    if adapter is not None:  # an adapted lm_head: its LoRA factors are read by the loss head too
        for layer in adapter[:2]:
            deepspeed.zero.register_external_parameter(wrapper.loss_head, layer.weight)
