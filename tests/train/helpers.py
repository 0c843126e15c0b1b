"""Shared pieces of the training tests: a tiny CPU config, an independent reference loss computed
from full logits (no fused head, no DP), and readers for the run's outputs."""

from __future__ import annotations

import copy

import torch

TINY = {
    "model": "tiny-llama",
    "data": {"source": "synthetic:product", "task_params": {"max_factor": 9}, "num_samples": 512},
    "loss": {"name": "cdiv", "params": {"alpha": 1.4}},
    "optim": {"name": "adam", "lr": 3.0e-3, "warmup_steps": 0, "schedule": "constant", "grad_clip": 0.0},
    "backend": {"name": "deepspeed", "zero_stage": 2, "bf16": False},
    "train": {
        "micro_batch_size": 8,
        "max_steps": 12,
        "log_every": 1,
        "checkpoint_every": 0,
        "progress_bar": False,
        "export_final": False,
        "seed": 0,
    },
}


def tiny_config_dict(output_dir, **sections) -> dict:
    """``TINY`` with ``output_dir`` and per-section overrides (``backend={"name": "fsdp2"}``)."""
    data = copy.deepcopy(TINY)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    data["train"]["output_dir"] = str(output_dir)
    return data


def build(data: dict):
    from recall_dist.train.config import train_config_from_dict

    return train_config_from_dict(data)


def reference_loss(model, batch, alpha: float | None) -> torch.Tensor:
    """Weighted NLL from full logits: w = exp((alpha - 1) * l) detached (c-Div, README "How the losses work";
    alpha None: plain NLL), L = sum w l / sum w over the valid shifted targets of the whole batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:].reshape(-1)
    logp = torch.log_softmax(logits[:, :-1].float().reshape(-1, logits.shape[-1]), dim=-1)
    valid = target != -100
    nll = -logp[valid].gather(1, target[valid].unsqueeze(1)).squeeze(1)
    w = torch.ones_like(nll) if alpha is None else torch.exp((alpha - 1.0) * nll.detach())
    return (w * nll).sum() / w.sum()
