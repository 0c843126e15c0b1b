"""DeepSpeed ZeRO stage 2 / 3 engine (bf16, optional CPU offload) behind the trainer's ``Engine`` seam.

Our JSON under ``configs/deepspeed/`` holds the ZeRO knobs; batch sizes, clipping, precision,
stage and offload are filled in from the ``TrainConfig`` so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import json

import torch

from recall_dist.train.backends import LRSchedule, lr_lambda, torch_optimizer
from recall_dist.train.config import TrainConfig
from recall_dist.train.loss_head import register_zero3_head


def deepspeed_config(cfg: TrainConfig, accumulation_steps: int, world_size: int) -> dict:
    """The DeepSpeed config dict: the JSON file, with our batch/precision/stage/offload settings."""
    with open(cfg.backend.resolved_deepspeed_config()) as f:
        ds = json.load(f)
    micro = cfg.train.micro_batch_size
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation_steps,
        train_batch_size=micro * accumulation_steps * world_size,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=2**31 - 1,
        wall_clock_breakdown=False,
        zero_allow_untested_optimizer=True,
    )
    ds["bf16"] = {"enabled": cfg.backend.bf16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.backend.zero_stage
    if cfg.backend.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.backend.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    if offloaded:  # DeepSpeed's CPU Adam steps the offloaded fp32 partitions
        ds["optimizer"] = {
            "type": "AdamW" if cfg.optim.name == "adamw" else "Adam",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
            },
        }
    else:
        ds.pop("optimizer", None)
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.pop("scheduler", None)  # ours, so that both backends share one schedule
    return ds


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the ``CausalLMWithLossHead``; DeepSpeed averages gradients over
    the data-parallel ranks and divides by the accumulation steps itself."""

    def __init__(self, cfg: TrainConfig, wrapper: torch.nn.Module, ctx, accumulation_steps: int, total_steps: int):
        import deepspeed

        self.ds_config = deepspeed_config(cfg, accumulation_steps, ctx.world_size)
        if cfg.backend.zero_stage == 3:
            register_zero3_head(wrapper)
        optimizer = None if "optimizer" in self.ds_config else torch_optimizer(cfg.optim, wrapper.parameters())
        factor = lr_lambda(cfg.optim, total_steps)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=wrapper,
            optimizer=optimizer,
            config=self.ds_config,
            lr_scheduler=lambda opt: LRSchedule(opt, factor, cfg.optim.lr),
        )
        self.module = self.ds.module
        self.device = ctx.device

    def forward(self, batch):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # only advances DeepSpeed's micro-step counter

    @contextlib.contextmanager
    def _frozen_update(self):
        """Make the ZeRO optimizer's inner torch step a no-op: the fp32 master weights and Adam
        moments stay as they were, and ZeRO copies the unchanged masters back."""
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        shadowed = inner.__dict__.get("step")
        inner.step = lambda *args, **kwargs: None
        try:
            yield
        finally:
            if shadowed is None:
                del inner.step
            else:
                inner.step = shadowed

    def step(self, skip: bool = False) -> float | None:
        with self._frozen_update() if skip else contextlib.nullcontext():
            self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        self.ds.save_checkpoint(directory, tag="engine", save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.ds.load_checkpoint(
            directory, tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")

    def full_state_dict(self):
        if self.ds.zero_optimization_partition_weights():
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict() if torch.distributed.get_rank() == 0 else None
        if state is None:
            return None
        return {k[len("model.") :]: v.detach().cpu().clone() for k, v in state.items() if k.startswith("model.")}

    def full_gradients(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return {
            name: safe_get_full_grad(p).detach().float().cpu().clone() for name, p in self.module.named_parameters()
        }
