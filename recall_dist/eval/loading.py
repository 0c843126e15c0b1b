"""Open a swept model: a Hugging Face export directory, or one of our raw training checkpoints
(exported to Hugging Face format once, into a cache entry named by the checkpoint's content)."""

from __future__ import annotations

from pathlib import Path

import torch

from recall_dist.constants import DTYPES
from recall_dist.distributed.ranks import env_local_rank
from recall_dist.eval.config import ModelSpec


def _dtype(name: str, auto):
    return auto if name == "auto" else DTYPES[name]


def load_model(spec: ModelSpec, cache_dir: Path, fingerprint: str, dtype: str = "auto"):
    """(model, tokenizer) on this rank's device, in eval mode.  ``fingerprint`` (the checkpoint's
    content, ``shards.model_fingerprint``) names the export of a raw checkpoint, so a retrained
    checkpoint at the same path is exported again instead of reusing the old export.  ``dtype``:
    ``auto`` (the saved dtype on a GPU, float32 on a CPU), ``float32`` or ``bfloat16``."""
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.train.lora import ADAPTER_CONFIG, load_merged

    path = Path(spec.path).expanduser()
    adapter = (path / ADAPTER_CONFIG).is_file()  # a LoRA run's final/: its base + the adapter, merged
    if not adapter and not (path / "config.json").is_file():
        from recall_dist.train.export import export_hf

        exported = cache_dir / f"{spec.name}-{fingerprint[:16]}"
        if not (exported / "config.json").is_file():
            export_hf(path, exported, merge=True)  # a LoRA checkpoint too: the sweep needs a whole model
        path = exported
    load = load_merged if adapter else AutoModelForCausalLM.from_pretrained
    if torch.cuda.is_available():
        local_rank = env_local_rank()
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        model = load(path, dtype=_dtype(dtype, "auto")).to(device)
    else:
        model = load(path, dtype=_dtype(dtype, torch.float32))
    return model.eval(), load_tokenizer(spec.tokenizer or path)
