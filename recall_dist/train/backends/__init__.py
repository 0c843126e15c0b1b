"""Backends behind one seam: each builds the model itself (sharded or partitioned from the start, never
a full copy per rank) and turns it, with the optimizer config, into an ``Engine`` (forward / backward /
step / save / load / export).  The training loop only sees ``Engine``: "model config in, sharded engine out";
``build_engine`` (``backends/build.py``) picks the backend.

Precision, one rule for both backends: ``backend.bf16`` is the *compute* dtype (forward and backward
matmuls in bf16); the master weights and the optimizer states are always fp32.  ``model.dtype`` is the
dtype of the weights at rest: how ``name_or_path`` is read and what ``final/`` is written in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from recall_dist.train.config import OptimConfig


@dataclass
class StepResult:
    """What one optimizer step did: the gradient norm before clipping (of the true, rescaled
    gradient; nan/inf when non-finite) and whether the update was skipped."""

    grad_norm: float | None
    skipped: bool


class Engine(Protocol):
    """What the trainer drives.  All methods are collective (every rank calls them, same order)."""

    module: torch.nn.Module  # the CausalLMWithLossHead (possibly sharded / partitioned)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's gradient.  ``loss`` is already that micro-batch's share of the step's
        objective: the engine sums micro-batches (no division by the accumulation steps) and averages
        over data-parallel ranks (the loss is scaled by the DP size for that)."""

    def step(self, grad_scale: float = 1.0) -> StepResult:
        """End of an optimizer step: multiply the accumulated gradients by ``grad_scale`` (the step's
        exact normaliser, known only after its last forward; applied by ``train/step_scale.py``), clip,
        update unless ``grad_scale`` is ``SKIP`` (0.0: a skipped step, ``losses/accumulator.py``) or the
        norm is non-finite, advance the LR schedule, zero the gradients."""

    def lr(self) -> float: ...

    def save(self, directory: str) -> None:
        """Model, optimizer and LR schedule into ``directory`` (shared by all ranks), sharded per rank."""

    def load(self, directory: str) -> None:
        """Restore from ``directory``, also when it was saved by a different number of ranks."""

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, full fp32 master value on rank 0 / None elsewhere) for every distinct parameter of the
        Hugging Face model, one at a time (collective); tied parameters once, under their first name."""

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


def stream_full_parameters(model: torch.nn.Module, gather) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, fp32 CPU value on rank 0 / None elsewhere) of every distinct parameter of ``model``, one at a
    time; ``gather(param)`` returns its full value and is collective.  Tied parameters come once, under their
    first name (``named_parameters`` removes duplicates).  A QLoRA base weight (4-bit, whole on every rank) is
    its dequantised value (``qlora.dequantized``), not its packed bytes."""
    from recall_dist.train.qlora import dequantized, is_quantized

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    for name, param in model.named_parameters():
        full = dequantized(param) if is_quantized(param) else gather(param)
        yield name, (full.detach().float().cpu() if rank0 else None)
        del full


def torch_optimizer(cfg: OptimConfig, params, device_type: str = "cpu") -> torch.optim.Optimizer:
    """Adam(W) over ``params``; the fused CUDA kernel on GPUs (one launch per step instead of several per
    tensor), the default multi-tensor path elsewhere."""
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    fused = {"fused": True} if device_type == "cuda" else {}
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **fused)
