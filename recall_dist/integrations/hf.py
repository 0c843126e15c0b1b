"""Hugging Face ``Trainer`` and TRL ``SFTTrainer`` with the recall loss in place of cross-entropy.

    trainer = RecallTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                            recall_loss="cdiv", recall_loss_params={"alpha": 1.4})

    class RecallSFTTrainer(RecallTrainerMixin, SFTTrainer):  # TRL: text datasets, packing, templates
        pass

What the mixin changes (needs transformers >= 5.19; tested with 5.24 and TRL 1.16; README, "API"):

- **Fused head.** The model runs to its final hidden states (``logits_to_keep=1``: one position's
  logits); ``LossHead`` (``recall_dist.train.loss_head``), attached to the model as
  ``recall_loss_head``, does the lm_head matmul inside ``fused_linear_loss``: no ``N x V`` logits.
- **Packing.** ``position_ids`` and the flash-attention varlen arguments (``cu_seq_lens_q/k``,
  ``max_length_q/k``, ``seq_idx``) reach the model, so packed sequences attend only to themselves;
  sequence ids come from the ``position_ids`` resets, so sequence-level rules (TruncR/TruncP) see
  sequences, not rows; a target that starts a sequence is never predicted from the one before.
- **Gradient accumulation.** One optimizer step is one objective, Z summed over all of its
  micro-batches and ranks (``RecallLoss.optimizer_step``, as ``recall-dist train`` does): Trainer
  fetches a step's micro-batches first, ``get_batch_samples`` counts their tokens N as the loss does,
  every micro-batch backpropagates with the provisional scale 1/N, and after the last backward (DDP's
  reduction done, before clipping) the gradients are multiplied by N / Z; truncation rules fix tau
  at the step's start.  The logged ``loss`` is that step objective, reported at the step's last
  micro-batch (the others report 0, Trainer sums them): 2 x 4 gives the update and the log of one
  batch of 8.  The step's statistics are logged with ``recall/`` names.
- **DeepSpeed.** The engine steps inside the last micro-batch's backward, so the factor N / Z goes
  through ZeRO's external loss scale, which divides the accumulated gradients before the norm, the
  clipping and the update (``recall_dist/train/step_scale.py``, as in ``recall-dist train``; a DeepSpeed
  without that hook is an error).  Under ZeRO-3 the head weight is registered as an external parameter
  of ``recall_loss_head``, so ZeRO gathers it for the loss (a fused head that reads it outside a
  forward sees a 0-element shard: TRL #3368).
- **Skipped steps** (non-finite logits, or no token with weight, e.g. every label ignored: the gradient
  scale is 0, ``losses/accumulator.py``): no update -- the gradients are dropped before the optimizer,
  or, under DeepSpeed, ZeRO's update is skipped.
- **peft adapters** (``SFTTrainer(..., peft_config=LoraConfig(...))``, or a ``PeftModel``): the head
  is looked up at every call through the peft wrapper (``model_output_layer``), so the frozen base head,
  a tied embedding, ``modules_to_save=["lm_head"]`` (the trained copy), trainable token rows
  (``trainable_token_indices`` on a tied embedding) and ``lm_head`` in ``target_modules`` all give the
  logits peft's own forward gives.  A LoRA head ``W + s B A`` runs as one matmul of augmented tensors,
  ``[x, s A drop(x)] @ [W, B]^T`` (exact, dropout included; the extra width is the rank r); DoRA,
  ``lora_bias`` and other peft layers on the head are refused.  (TRL 1.16's ``SFTTrainer`` refuses
  ``lm_head`` in ``target_modules`` itself; ``RecallTrainer`` takes it.)
- FSDP through ``Trainer`` is not supported (the weight is a shard outside a forward): use
  ``recall-dist train``.  Evaluation reports the loss (``prediction_loss_only``); there are no logits.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
import transformers
from transformers import Trainer

from recall_dist.constants import IGNORE_INDEX
from recall_dist.distributed.ranks import world_group
from recall_dist.losses.accumulator import step_token_count
from recall_dist.losses.base import RecallLoss, build_loss
from recall_dist.parallel.options import KernelOptions
from recall_dist.train.lora import widen_for_head_adapter
from recall_dist.train.loss_head import LossHead
from recall_dist.train.step_scale import ZeroStepScale, scale_gradients_

# Batch keys of packed (padding-free) batches that the model needs to keep sequences apart.
PACKING_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
HEAD_NAME = "recall_loss_head"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP, DeepSpeed engine
        model = model.module
    return model


def default_dp_group():
    """The world group when training on several processes (DDP, ZeRO), else None."""
    return world_group()


def sequence_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` ids, one per packed sequence: a new one starts wherever ``position_ids`` is 0 and at
    every row start (``[[0, 1, 2, 0, 1]] -> [[0, 0, 0, 1, 1]]``)."""
    starts = position_ids == 0
    starts[..., 0] = True
    return starts.reshape(-1).long().cumsum(0).view_as(position_ids) - 1


def _peft_classes():
    """peft's wrapper classes, or ``None`` when peft was never imported (then no model is a peft model)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper

    return LoraLayer, BaseTunerLayer, ModulesToSaveWrapper, TrainableTokensWrapper, AuxiliaryTrainingWrapper


def _refuse(name: str, what: str) -> ValueError:
    return ValueError(
        f"{what} on {name}: the recall loss does the {name} matmul itself and supports a frozen {name}, "
        f"modules_to_save=['{name}'], trainable tokens, or plain LoRA with '{name}' in target_modules; "
        f"remove '{name}' from the peft config's target_modules (or that option)"
    )


class OutputLayer(NamedTuple):
    """What a model's output layer computes: ``logits = x weight^T + sum s B A drop(x)`` over ``adapters``
    (``(lora_A, lora_B, dropout, scaling)``); ``reads``: the parameters behind ``weight`` and the adapters'
    ``B`` (the loss reads them outside their modules' forwards: ZeRO-3 must gather them for it)."""

    weight: torch.Tensor
    adapters: list
    reads: list


def model_output_layer(layer: torch.nn.Module, name: str = "lm_head") -> OutputLayer:
    """What the output layer ``layer`` (``get_output_embeddings()``, maybe wrapped by peft; ``name``: its
    name in the model, for errors) computes, as peft's own forward would: the frozen or tied weight; the
    active copy of ``modules_to_save``; the base with the trainable token rows written in
    (``trainable_token_indices`` on a tied embedding); or the base plus the active unmerged LoRA terms
    (``lm_head`` in ``target_modules``).  Raises ``ValueError`` for what the loss cannot reproduce."""
    classes = _peft_classes()
    if classes is None:
        return OutputLayer(layer.weight, [], [layer.weight])
    lora_layer, tuner_layer, modules_to_save, trainable_tokens, other_wrapper = classes
    if isinstance(layer, modules_to_save):
        active = layer.active_adapters
        if layer.disable_adapters or not active or any(a not in layer._adapters for a in active):
            layer = layer.original_module
        else:
            layer = layer.modules_to_save[active[0]]  # peft's forward uses the first active copy
        return OutputLayer(layer.weight, [], [layer.weight])
    if isinstance(layer, trainable_tokens):
        tokens = layer.token_adapter  # it handles its own disabled / merged states, as here
        base = tokens.get_base_layer().weight
        if tokens.disable_adapters or not tokens.active_adapters or tokens.merged:
            return OutputLayer(base, [], [base])
        tokens._check_overlapping_tokens(tokens.active_adapters)
        deltas = [tokens.trainable_tokens_delta[a] for a in tokens.active_adapters]
        return OutputLayer(tokens.get_merged_weights(tokens.active_adapters), [], [base, *deltas])
    if isinstance(layer, other_wrapper):
        raise _refuse(name, f"peft's {type(layer).__name__}")
    if not isinstance(layer, tuner_layer):
        return OutputLayer(layer.weight, [], [layer.weight])
    if not isinstance(layer, lora_layer):
        raise _refuse(name, f"peft's {type(layer).__name__}")
    base = layer.get_base_layer().weight
    if layer.disable_adapters or layer.merged:  # merged: W already holds B A (peft then adds nothing)
        return OutputLayer(base, [], [base])
    adapters = []
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue  # peft skips it too
        if adapter in layer.lora_variant:
            raise _refuse(name, f"the LoRA variant {type(layer.lora_variant[adapter]).__name__} (e.g. use_dora)")
        if layer.lora_bias[adapter]:
            raise _refuse(name, "lora_bias=True")
        terms = (layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter], layer.scaling[adapter])
        adapters.append(terms)
    return OutputLayer(base, adapters, [base, *(lora_b.weight for _, lora_b, _, _ in adapters)])


class ModelLossHead(LossHead):
    """``LossHead`` of a Hugging Face causal LM: the output layer is looked up through the model at every
    call (``model.get_output_embeddings()``, through a peft wrapper applied before or after attaching),
    so the loss always uses the head that the model's own forward would (``model_output_layer``).

    With LoRA on the head, each active adapter widens the hidden states and the weight as
    ``train/lora.py``'s ``widen_for_head_adapter`` does (``[W, B] [x; s A drop(x)]``, ``[V, H + r]``): one
    matmul gives ``x W^T + s B A drop(x)`` and autograd carries the fused head's gradients to ``A`` and
    ``B``.  The dropout draws its mask over all ``[B, T, H]`` positions, as peft's own head forward does."""

    def __init__(self, model: torch.nn.Module, **kwargs):
        super().__init__(model, None, **kwargs)
        layer = model.get_output_embeddings()
        path = next((n for n, m in model.named_modules() if m is layer), "lm_head")
        self.output_name = path.rsplit(".", 1)[-1]  # as target_modules names it
        self._call_weight: list[torch.Tensor] = []  # a list: a Parameter set as an attribute would be registered
        self.output_layer()  # refuses an unsupported head when attached, not at the first step

    def output_layer(self) -> OutputLayer:
        return model_output_layer(self._weight_owner[0].get_output_embeddings(), self.output_name)

    def parameters_read(self) -> list[torch.nn.Parameter]:
        """Every parameter the loss reads outside its module's forward: ZeRO-3 must gather them for ours."""
        return self.output_layer().reads

    @property
    def weight(self) -> torch.Tensor:
        """The weight of the call in progress (widened by the head's adapters), else the output layer's."""
        return self._call_weight[-1] if self._call_weight else self.output_layer().weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None):
        weight, adapters, _ = self.output_layer()
        for adapter in adapters:
            hidden, weight = widen_for_head_adapter(hidden, weight, adapter)
        self._call_weight.append(weight)
        try:
            return super().forward(hidden, labels, sequence_ids)
        finally:
            self._call_weight.pop()


def attach_loss_head(model: torch.nn.Module) -> LossHead:
    """The model's ``recall_loss_head`` (created on first use): a parameter-free module that owns the
    fused loss, so that ZeRO-3 hooks can gather the head weight around it.  Attach it before
    DeepSpeed wraps the model (``Trainer.train`` does that): ZeRO-3 hooks the modules it finds then."""
    base = unwrap(model)
    head = getattr(base, HEAD_NAME, None)
    if head is None:
        # the RECALL_DIST_* kernel variables, read once: when the head is made
        head = ModelLossHead(base, vocab_size=base.config.vocab_size, kernel=kernel_options())
        base.add_module(HEAD_NAME, head)
    return head


def _register_zero3(head: ModelLossHead) -> None:
    if getattr(head, "_zero3_registered", False):
        return
    weights = [w for w in head.parameters_read() if hasattr(w, "ds_id")]
    if weights:
        import deepspeed

        for weight in weights:
            deepspeed.zero.register_external_parameter(head, weight)
        head._zero3_registered = True


def kernel_options(kernel: str | KernelOptions | None = None) -> KernelOptions:
    """``kernel`` (a name: that kernel, the other options at their defaults; ``None``: the defaults) with
    the ``RECALL_DIST_*`` variables that are set over it, read now (``docs/kernels.md``).  Called once, at
    the start: ``RecallTrainer``'s construction, the head's creation (``attach_loss_head``)."""
    return KernelOptions.from_env(KernelOptions(kernel=kernel) if isinstance(kernel, str) else kernel)


def recall_loss_and_stats(
    model, inputs: dict, loss: RecallLoss, dp_group="auto", chunk_size: int | None = None, kernel=None
):
    """``(loss, stats)`` of a Hugging Face causal LM on ``inputs`` (``input_ids``, ``labels`` aligned
    with them, -100 where no loss; optional ``attention_mask`` and ``PACKING_KEYS``).  ``loss`` is
    this rank's share of the objective normalised over this call (``dp_group="auto"``: the world
    group under DDP/ZeRO, so averaged gradients are the global objective's).  ``kernel``: ``None`` keeps
    the head's options (the variables read when the head was attached); a ``KernelOptions`` or a kernel
    name is used as given (``kernel_options(kernel)`` merges the variables, once, at a caller's start)."""
    head = attach_loss_head(model)
    head.loss, head.chunk_size = loss, chunk_size
    if kernel is not None:
        head.kernel = kernel if isinstance(kernel, KernelOptions) else KernelOptions(kernel=kernel)
    head.dp_group = default_dp_group() if dp_group == "auto" else dp_group
    _register_zero3(head)
    labels, sequence_ids = inputs["labels"], None
    packing = {k: inputs[k] for k in PACKING_KEYS if k in inputs}
    if "position_ids" in packing:
        sequence_ids = sequence_ids_from_positions(packing["position_ids"])
        # the first token of a packed sequence is not a prediction of the sequence before it
        labels = labels.masked_fill(packing["position_ids"] == 0, IGNORE_INDEX)
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **packing,
    )
    hidden = outputs.hidden_states[-1]  # after the final norm: what lm_head consumes
    return head(hidden, labels, sequence_ids)


def recall_compute_loss(
    model, inputs: dict, loss: RecallLoss, dp_group="auto", chunk_size=None, return_outputs=False, kernel=None
):
    """The recall loss of one batch (no accumulation bookkeeping): for your own training loop or
    ``Trainer.compute_loss``.  Attaches ``recall_loss_head`` to the model on first use."""
    value, stats = recall_loss_and_stats(model, inputs, loss, dp_group, chunk_size, kernel)
    return (value, {"stats": stats}) if return_outputs else value


class RecallTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (``RecallTrainer``, or TRL's ``SFTTrainer``) before
    it: ``compute_loss`` becomes the recall loss ``build_loss(recall_loss, **recall_loss_params)``
    with the semantics of the module docstring."""

    loss_is_scaled_for_ga = True  # our loss is normalised over the step (transformers >= 5.19 reads this)

    def __init__(
        self,
        *args,
        recall_loss: str = "cdiv",
        recall_loss_params: dict | None = None,
        chunk_size: int | None = None,
        kernel: str | KernelOptions | None = None,
        **kwargs,
    ):
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            raise ImportError(
                "RecallTrainerMixin needs transformers >= 5.19 (Trainer.loss_is_scaled_for_ga); "
                f"found {transformers.__version__}"
            )
        super().__init__(*args, **kwargs)
        self.recall_loss = build_loss(recall_loss, **(recall_loss_params or {}))
        if self.is_fsdp_enabled:
            raise ValueError("RecallTrainer does not support FSDP through Trainer; use `recall-dist train` (FSDP2)")
        loss = self.recall_loss
        if self.args.gradient_accumulation_steps > 1 and loss.nll_mix > 0 and loss.normalize == "weights":
            raise ValueError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps} with nll_mix={loss.nll_mix} and "
                "normalize='weights': two normalisers (the sum of weights and the token count) cannot both be "
                "applied over an accumulated step; use normalize='tokens' or gradient_accumulation_steps=1"
            )
        self.chunk_size = chunk_size
        # how the loss head runs (docs/kernels.md): the RECALL_DIST_* variables win, read once, here
        self.recall_kernel = kernel_options(kernel)
        attach_loss_head(self.model)
        self._micro_batch = 0
        self._step_context = self._objective = None
        self._zero_scale: ZeroStepScale | None = None
        self.last_recall_stats: dict[str, float] = {}

    def train(self, *args, **kwargs):
        self._close_step()  # a run stopped inside a step must not leave it open
        return super().train(*args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer fetches a step's micro-batches before the first forward: count their tokens here,
        as the loss does (``num_items_in_batch`` becomes that count)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        # recall_loss_and_stats masks each packed sequence's first target (position_ids == 0): count so too
        return batches, step_token_count(batches, default_dp_group(), mask_sequence_starts=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        value, stats = recall_loss_and_stats(
            model, inputs, self.recall_loss, chunk_size=self.chunk_size, kernel=self.recall_kernel
        )
        if self._objective is None:  # evaluation, or a call outside Trainer's loop: one batch, one step
            self.last_recall_stats = stats
        elif self._micro_batch == self._micro_batches_in_step() and self.is_deepspeed_enabled:
            # DeepSpeed steps inside this backward: the step's scale must be in place before it
            self._deepspeed_scale().arm(self._objective.gradient_scale())
            value = self._zero_scale.scale_loss(value)
        return (value, {"stats": stats}) if return_outputs else value

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._micro_batch == 0:
            if num_items_in_batch is None:
                raise RuntimeError("RecallTrainerMixin: no token count for the step (Trainer.get_batch_samples)")
            self._step_context = self.recall_loss.optimizer_step(float(num_items_in_batch))
            self._objective = self._step_context.__enter__()
        self._micro_batch += 1
        try:
            super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._close_step()
            raise
        if self._micro_batch < self._micro_batches_in_step():
            return torch.zeros((), device=self.args.device)  # the step's loss is reported at its last micro-batch
        scale, stats = self._objective.gradient_scale(), self._objective.stats()
        self._close_step()
        if not self.is_deepspeed_enabled:  # DeepSpeed applied it inside its step (compute_loss)
            scale_gradients_([model], scale)  # SKIP (a skipped step) drops the gradients: no update
        self.last_recall_stats = stats | self.recall_loss.rule.extra_stats()
        return torch.tensor(stats["loss"], device=self.args.device)

    def _micro_batches_in_step(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _deepspeed_scale(self) -> ZeroStepScale:
        """The step scale of the DeepSpeed engine ``Trainer.train`` built (``train/step_scale.py``)."""
        engine = self.model_wrapped
        if self._zero_scale is None or self._zero_scale.engine is not engine:
            self._zero_scale = ZeroStepScale.for_engine(engine, rescales=self.recall_loss.normalize == "weights")
        return self._zero_scale

    def _close_step(self) -> None:
        if self._zero_scale is not None:  # every later backward runs unscaled, every later update runs
            self._zero_scale.disarm()
        if self._step_context is not None:
            self._step_context.__exit__(None, None, None)
        self._step_context = self._objective = None
        self._micro_batch = 0

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **{f"recall/{k}": v for k, v in self.last_recall_stats.items()}}
        super().log(logs, *args, **kwargs)


class RecallTrainer(RecallTrainerMixin, Trainer):
    """``transformers.Trainer`` whose loss is a recall loss (``recall_loss``, ``recall_loss_params``)."""
