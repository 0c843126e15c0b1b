"""Export a trained model in Hugging Face format (``save_pretrained`` + tokenizer), which the
temperature sweep loads: from the live engine at the end of training (``export_from_engine``), or
offline from a checkpoint directory (``export_hf``), both written atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from recall_dist.configtree import load_yaml
from recall_dist.train.config import train_config_from_dict


def _save_hf(model, state_dict: dict, tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def export_from_engine(engine, tokenizer, out_dir: str | Path, rank: int) -> Path | None:
    """Collective: gather the full weights and write them (rank 0) to ``out_dir``."""
    state = engine.full_state_dict()
    if rank != 0:
        return None
    return _save_hf(engine.module.model, state, tokenizer, out_dir)


def _engine_state_dict(engine_dir: Path, backend: str, model) -> dict[str, torch.Tensor]:
    """The HF model's full fp32 state dict read from a checkpoint's ``engine/`` directory."""
    if backend == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="engine")
        return {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
    import torch.distributed.checkpoint as dcp

    model.to_empty(device="cpu")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(engine_dir), no_dist=True)
    return {k[len("model.") :]: v for k, v in state.items()}


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model of training checkpoint ``checkpoint_dir`` (``.../checkpoints/step_X``) and
    its tokenizer to ``out_dir`` in Hugging Face format.  Runs in one process, no GPU needed."""
    from recall_dist.data import load_tokenizer
    from recall_dist.train.models import build_model

    checkpoint_dir = Path(checkpoint_dir)
    cfg = train_config_from_dict(load_yaml(checkpoint_dir / "config.yaml"))
    model = build_model(cfg.model, meta=True)
    state = _engine_state_dict(checkpoint_dir / "engine", cfg.backend.name, model)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)
    return _save_hf(model, state, load_tokenizer(cfg.model.tokenizer_name), out_dir)
