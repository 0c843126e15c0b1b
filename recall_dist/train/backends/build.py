"""The one seam the trainer calls: ``build_engine`` picks the backend of ``cfg.backend.name`` (each imported
only when chosen: DeepSpeed is not imported by an FSDP2 run).  Apart from ``backends/__init__.py``, which
holds what the backends share and which they import: a dispatcher there would make the package and its
backends import each other.
"""

from __future__ import annotations

from typing import Any

from recall_dist.train.backends import Engine
from recall_dist.train.config import TrainConfig


def build_engine(cfg: TrainConfig, ctx: Any, loss, accumulation_steps: int, total_steps: int) -> Engine:
    """The engine of ``cfg.backend.name``: it builds the model of ``cfg.model`` (weights from the pretrained
    checkpoint or the seeded initialisation, only this rank's part), wraps it with the loss head and shards it."""
    if cfg.backend.name == "deepspeed":
        from recall_dist.train.backends.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, ctx, loss, accumulation_steps, total_steps)
    from recall_dist.train.backends.fsdp2 import FSDP2Engine

    return FSDP2Engine(cfg, ctx, loss, accumulation_steps, total_steps)
