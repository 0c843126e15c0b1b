"""PyTorch FSDP2 engine: ``fully_shard`` on every decoder layer, then on the root (embeddings, final
norm and lm_head stay unsharded through the root's forward, where the loss head runs; see ``loss_head.py``),
with a mixed-precision policy, Adam on the sharded (DTensor) parameters, and
``torch.distributed.checkpoint`` for save/load.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from recall_dist.constants import DTYPES
from recall_dist.train.backends import LRSchedule, lr_lambda, torch_optimizer
from recall_dist.train.config import TrainConfig
from recall_dist.train.models import decoder_layers


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
    """Shard ``wrapper`` (a ``CausalLMWithLossHead``) in place: per decoder layer, then the root."""
    backend = cfg.backend
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if backend.bf16 else torch.float32, reduce_dtype=DTYPES[backend.fsdp_reduce_dtype]
    )
    kwargs = {"mp_policy": policy}
    if backend.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, reshard_after_forward=backend.fsdp_reshard_after_forward, **kwargs)
    fully_shard(wrapper, **kwargs)
    return wrapper


class FSDP2Engine:
    """FSDP2 averages gradients over the data-parallel ranks in its reduce-scatter; we divide the
    loss by the accumulation steps and skip the optimizer update on a non-finite step."""

    def __init__(self, cfg: TrainConfig, wrapper: nn.Module, ctx, accumulation_steps: int, total_steps: int):
        # fully_shard moves each rank's shards (and the buffers) to the mesh's device: the full
        # model never has to fit on one GPU.
        self.module = apply_fsdp2(wrapper, cfg)
        self.accumulation_steps = accumulation_steps
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = torch_optimizer(cfg.optim, self.module.parameters())
        self.scheduler = LRSchedule(self.optimizer, lr_lambda(cfg.optim, total_steps), cfg.optim.lr)

    def forward(self, batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self, skip: bool = False) -> float | None:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = None
        if params:
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        if not skip:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save(
            {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()},
            checkpoint_id=directory,
        )

    def load(self, directory: str) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict()}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        if torch.distributed.get_rank() != 0:
            return None
        return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, p in self.module.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().float().cpu().clone()
        return grads
