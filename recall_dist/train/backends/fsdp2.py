"""PyTorch FSDP2 engine: ``fully_shard`` on every decoder layer, then on the root (embeddings, final
norm and lm_head stay unsharded through the root's forward, where the loss head runs; see ``loss_head.py``),
with a mixed-precision policy, Adam on the sharded (DTensor) parameters, and
``torch.distributed.checkpoint`` for save/load.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from recall_dist.constants import DTYPES
from recall_dist.losses.accumulator import SKIP
from recall_dist.train.backends import LRSchedule, StepResult, lr_lambda, stream_full_parameters, torch_optimizer
from recall_dist.train.config import TrainConfig
from recall_dist.train.lora import is_adapter_parameter, trainable_parameters
from recall_dist.train.loss_head import CausalLMWithLossHead
from recall_dist.train.models import build_model, decoder_layers, materialize, quantize_if_4bit, weight_source
from recall_dist.train.qlora import drop_four_bit_state, four_bit_parameters
from recall_dist.train.step_scale import scale_gradients_
from recall_dist.train.weights import load_weights


def sharding_plan(model: nn.Module) -> dict[str, list[str]]:
    """FSDP unit -> the parameter names it shards: one unit per decoder layer, the rest in the root.
    Works on the meta device; every parameter appears in exactly one unit."""
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    plan: dict[str, list[str]] = {}
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            params = [f"{name}.{n}" for n, p in module.named_parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in module.parameters())
            plan[name] = params
    plan["<root>"] = [n for n, p in model.named_parameters() if id(p) not in claimed]
    return plan


def apply_fsdp2(wrapper: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Shard ``wrapper`` (a ``CausalLMWithLossHead``) in place: per decoder layer, then the root.  The layers of
    a QLoRA base (``qlora.replace_with_4bit``) are left out (``ignored_params``): bitsandbytes packs a 4-bit
    weight with statistics outside the tensor, which FSDP2 cannot shard; each rank holds it whole."""
    backend = cfg.backend
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if backend.bf16 else torch.float32, reduce_dtype=DTYPES[backend.fsdp_reduce_dtype]
    )
    kwargs = {"mp_policy": policy}
    four_bit = four_bit_parameters(wrapper)
    if four_bit:  # QLoRA: the 4-bit base stays whole on every rank (replicated), the adapters are sharded
        kwargs["ignored_params"] = four_bit
    if backend.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, reshard_after_forward=backend.fsdp_reshard_after_forward, **kwargs)
    fully_shard(wrapper, **kwargs)
    return wrapper


class FSDP2Engine:
    """Builds the model on the meta device, shards it (``apply_fsdp2``), allocates only this rank's fp32
    shards (the master weights) and writes them from the weight source; the optimizer steps those fp32
    shards, so bf16 compute never rounds away a small update.  FSDP2 averages gradients over the
    data-parallel ranks in its reduce-scatter (in ``fsdp_reduce_dtype``, fp32 by default).

    With ``model.lora`` the frozen base is sharded in ``model.dtype`` (FSDP2 all-gathers mixed dtypes through
    a byte buffer and requires one dtype only among the trainable parameters: the fp32 adapters, in the same
    per-layer units); the optimizer, its state and the checkpoints hold the adapters only (the base is
    rebuilt from its source on a resume).  Under QLoRA the 4-bit base is not sharded: every rank holds it whole
    (``apply_fsdp2``), quantised on the device after the weights are loaded."""

    def __init__(self, cfg: TrainConfig, ctx, loss, accumulation_steps: int, total_steps: int):
        lora = cfg.model.lora is not None
        model = build_model(
            cfg.model,
            meta=True,
            # the sharded trainable parameters are the fp32 masters (MixedPrecisionPolicy casts); a frozen
            # LoRA base stays in its dtype at rest
            dtype=DTYPES[cfg.model.dtype] if lora else torch.float32,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            device_type=ctx.device.type,
        )
        wrapper = CausalLMWithLossHead(
            model, loss, ctx.dp_group, chunk_size=cfg.loss.chunk_size, kernel=cfg.loss.kernel_options()
        )
        self.module = apply_fsdp2(wrapper, cfg)
        # With CPU offload the sharded masters live in host memory; FSDP2 copies each unit to the GPU
        # for its forward/backward.
        materialize(model, "cpu" if cfg.backend.cpu_offload else ctx.device)
        source = weight_source(cfg.model, model, cfg.train.seed)
        load_weights(model, source)
        quantize_if_4bit(model, ctx.device)  # QLoRA: the unsharded base weights become 4-bit, on the device
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = torch_optimizer(cfg.optim, trainable_parameters(self.module), ctx.device.type)
        # A LoRA checkpoint holds what trains: the base is rebuilt from its source on a resume.
        self.state_options = StateDictOptions(ignore_frozen_params=lora)
        self.scheduler = LRSchedule(self.optimizer, lr_lambda(cfg.optim, total_steps), cfg.optim.lr)

    def forward(self, batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, grad_scale: float = 1.0) -> StepResult:
        scale_gradients_([self.module], grad_scale)  # SKIP drops every gradient: no update (step_scale.py)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = None
        if params:
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        skipped = grad_scale == SKIP or (norm is not None and not math.isfinite(norm))
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        # Sharded state dicts: each rank writes its own shards, nobody gathers the model; DCP
        # records the global layout, so a different number of ranks can load it (resharding).
        model_state, optim_state = self._state_dicts()
        dcp.save(
            {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()},
            checkpoint_id=directory,
        )

    def _state_dicts(self) -> tuple[dict, dict]:
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=self.state_options)
        if self.state_options.ignore_frozen_params:
            # ignore_frozen_params drops a frozen parameter under its first name only: a tied lm_head.weight
            # (the embedding under a second name) would still be saved.
            for name, param in self.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    model_state.pop(name, None)
            drop_four_bit_state(model_state, self.module)  # bitsandbytes' quantisation statistics
        return model_state, optim_state

    def load(self, directory: str) -> None:
        model_state, optim_state = self._state_dicts()
        state = {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()}
        dcp.load(state, checkpoint_id=directory)
        # Loading a LoRA checkpoint leaves the base as built (not strict); every adapter must come back.
        load_options = dataclasses.replace(self.state_options, strict=not self.state_options.ignore_frozen_params)
        result = set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=load_options,
        )
        lost = [k for k in getattr(result, "missing_keys", []) if is_adapter_parameter(k)]
        if lost or getattr(result, "unexpected_keys", []):
            raise RuntimeError(f"{directory}: adapters missing {lost}, unexpected {result.unexpected_keys}")
        self.scheduler.load_state_dict(state["scheduler"])

    def full_parameters(self):
        # The sharded parameters are the fp32 masters; full_tensor all-gathers one of them.
        return stream_full_parameters(self.module.model, lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, p in self.module.named_parameters():
            if p.grad is None:  # a frozen (LoRA base) parameter
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().float().cpu().clone()
        return grads
