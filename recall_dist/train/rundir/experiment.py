"""The experiment fingerprint a checkpoint carries (``fingerprint.json``), and the check that a resume
continues the same experiment (``check_same_experiment``).

The fingerprint: the config keys that change the experiment (model, loss, optim, data), flattened
(``loss.params.alpha``), with their SHA-256 (``model.lora.*``: a LoRA run and a full run are different
experiments).  Not fingerprinted: what final/ holds (``model.lora.merge_on_export``), keys that change how
the run is computed, not what (``model.attn_implementation``, ``loss.chunk_size``, the kernel choices ``loss.kernel``,
``loss.head_schedule``, ``loss.head_matmul``, ``loss.triton_tiles``), the validation set
(``data.eval_source``, ``data.eval_split``), and the train/backend sections (run length, batching
checks of their own, checkpoints, logging, the backend).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from recall_dist.train.rundir.errors import RunDirError

FINGERPRINT = "fingerprint.json"
SECTIONS = ("model", "loss", "optim", "data")
# How the loss is computed (attention and loss kernels, chunking) changes rounding, not the experiment; the
# validation set is measured, not trained on: changing either continues the same experiment.
NOT_FINGERPRINTED = (
    "model.attn_implementation",
    "model.lora.merge_on_export",  # what final/ holds (adapter or merged), not what trains
    "loss.chunk_size",
    "loss.kernel",
    "loss.head_schedule",
    "loss.head_matmul",
    "loss.triton_tiles",
    "data.eval_source",
    "data.eval_split",
)


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}", out)
    else:
        out[prefix] = json.loads(json.dumps(value))  # tuples -> lists, as they come back from a file


def config_fingerprint(config: dict) -> dict:
    """``{"sha256": ..., "keys": {"loss.params.alpha": 1.4, ...}}`` of a config dict (``to_dict(cfg)``)."""
    keys: dict = {}
    for section in SECTIONS:
        _flatten(config.get(section), section, keys)
    keys = {k: v for k, v in keys.items() if k not in NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "keys": keys}


def _data_defaults() -> dict:
    """The flattened defaults of the data section (``data.messages_field``: ``"messages"``, ...), and of the
    model keys added since (``model.lora``: null, a full fine-tune)."""
    from recall_dist.configtree import to_dict
    from recall_dist.data.config import DataConfig

    keys: dict = {"model.lora": None}
    _flatten(to_dict(DataConfig()), "data", keys)
    return keys


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every fingerprinted key whose value differs (absent: ``(not set)``).
    A data key the checkpoint does not have, at its default value, is no difference: it was added to
    recall_dist after the checkpoint was written (``data.messages_field``, ``model.lora``: null, ...) and
    changes nothing.  A LoRA run and a full run differ (``model.lora.r: (not set) -> 16``, ...)."""
    a, b = saved["keys"], current["keys"]
    missing = "(not set)"
    defaults = _data_defaults()
    lines = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old == missing and key in defaults and new == defaults[key]:
            continue
        if old != new:
            lines.append(f"{key}: {old!r} -> {new!r}")
    return lines


def read_fingerprint(checkpoint: str | Path) -> dict:
    """The fingerprint saved with ``checkpoint`` (every checkpoint has one; the manifest lists it)."""
    path = Path(checkpoint) / FINGERPRINT
    if not path.is_file():
        raise RunDirError("train.resume", f"checkpoint {checkpoint} has no {FINGERPRINT}: it cannot be resumed")
    return json.loads(path.read_text())


def check_same_experiment(saved: dict, current: dict, checkpoint: Path, allow_change: bool) -> list[str]:
    """Raise ``RunDirError`` listing the differences unless ``allow_change``; returns them."""
    diff = fingerprint_differences(saved, current)
    if diff and not allow_change:
        listing = "\n  ".join(diff)
        raise RunDirError(
            "train.resume",
            f"checkpoint {checkpoint} belongs to a different experiment (checkpoint -> this config):\n  "
            f"{listing}\nResuming would continue that run under the new settings and replace its final/. "
            f"Use another train.output_dir for a new experiment, or set train.allow_config_change=true to "
            f"continue it with these settings.",
        )
    return diff
