"""Backends behind one seam: each turns the wrapped model and the optimizer config into an
``Engine`` (forward / backward / step / save / load / export).  The training loop only sees ``Engine``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from recall_dist.train.config import OptimConfig, TrainConfig


class Engine(Protocol):
    """What the trainer drives.  All methods are collective (every rank calls them, same order)."""

    module: torch.nn.Module  # the CausalLMWithLossHead (possibly sharded / partitioned)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-batch (scaled by 1/accumulation steps inside)."""

    def step(self, skip: bool = False) -> float | None:
        """End of an optimizer step: clip, update (unless ``skip``), advance the LR schedule, zero
        the gradients.  Returns the gradient norm before clipping when the backend reports it."""

    def lr(self) -> float: ...

    def save(self, directory: str) -> None:
        """Model, optimizer and LR schedule into ``directory`` (shared by all ranks)."""

    def load(self, directory: str) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The Hugging Face model's full state dict on rank 0 (None elsewhere)."""

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Full (unsharded, DP-averaged) gradients by parameter name, after ``backward``; for tests."""


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then constant/linear/cosine."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class LRSchedule:
    """``lr = base_lr * factor(step)`` on every param group of any optimizer-like object (DeepSpeed's
    ZeRO optimizers are not ``torch.optim.Optimizer``s, so ``LambdaLR`` refuses them).  Stepped once
    per optimizer step; its state is the step count."""

    def __init__(self, optimizer, factor, base_lr: float):
        self.optimizer, self.factor, self.base_lr, self.last_step = optimizer, factor, base_lr, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.factor(self.last_step)

    def step(self, *args, **kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def torch_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_engine(
    cfg: TrainConfig, wrapper: torch.nn.Module, ctx: Any, accumulation_steps: int, total_steps: int
) -> Engine:
    """The engine of ``cfg.backend.name`` around ``wrapper`` (a ``CausalLMWithLossHead``)."""
    if cfg.backend.name == "deepspeed":
        from recall_dist.train.backends.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, wrapper, ctx, accumulation_steps, total_steps)
    from recall_dist.train.backends.fsdp2 import FSDP2Engine

    return FSDP2Engine(cfg, wrapper, ctx, accumulation_steps, total_steps)
