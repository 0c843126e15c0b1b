"""Open a swept model: a Hugging Face export directory, or one of our raw training checkpoints
(exported to Hugging Face format once, into a cache entry named by the checkpoint's content)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from recall_dist.constants import DTYPES
from recall_dist.distributed.ranks import env_local_rank
from recall_dist.eval.config import ModelSpec
from recall_dist.log import get_logger
from recall_dist.train.precision import native_bf16

IF_NATIVE = "bfloat16_if_native"
log = get_logger("eval")


def compute_dtype(name: str, device: torch.device | str, cpuinfo: str | None = None):
    """The dtype a model is loaded in for the sweep's ``dtype = name`` on ``device``: ``auto`` -> "auto"
    (the saved dtype) on a GPU, float32 on a CPU; ``bfloat16_if_native`` -> bfloat16 where ``device``
    computes bf16 natively (``train/precision.native_bf16``; a CPU judged by ``cpuinfo``, default
    ``/proc/cpuinfo``), else float32; ``float32`` / ``bfloat16`` as named."""
    device = torch.device(device)
    if name == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    if name == IF_NATIVE:
        native, why = native_bf16(device, cpuinfo)
        _log_choice(native, why)
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


@functools.cache
def _log_choice(native: bool, why: str) -> None:  # once per process, not once per model
    log.info("dtype=%s: %s (%s)", IF_NATIVE, "bfloat16" if native else "float32", why)


def load_model(spec: ModelSpec, cache_dir: Path, fingerprint: str, dtype: str = "auto"):
    """(model, tokenizer) on this rank's device, in eval mode.  ``fingerprint`` (the checkpoint's
    content, ``shards.model_fingerprint``) names the export of a raw checkpoint, so a retrained
    checkpoint at the same path is exported again instead of reusing the old export.  ``dtype``:
    ``auto`` (the saved dtype on a GPU, float32 on a CPU), ``float32``, ``bfloat16`` or
    ``bfloat16_if_native`` (``compute_dtype``)."""
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
        model = load(path, dtype=compute_dtype(dtype, device)).to(device)
    else:
        model = load(path, dtype=compute_dtype(dtype, "cpu"))
    return model.eval(), load_tokenizer(spec.tokenizer or path)
