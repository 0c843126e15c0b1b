"""Export a trained model in Hugging Face format (config, sharded safetensors + index, tokenizer), which
the temperature sweep and ``from_pretrained`` load: from the live engine at the end of training
(``export_from_engine``), or offline from a checkpoint directory (``export_hf``).  A pretrained base's
``generation_config.json`` (stop ids, chat defaults) goes with it (``base_generation_config``).

Streamed: parameters arrive one at a time (gathered from their shards), are cast to ``model.dtype`` and
appended to the current safetensors shard; a shard is written as soon as it reaches ``max_shard_bytes``.
So the writer holds at most one shard plus one parameter, never the model.

Atomic: everything is written to ``.tmp-<name>/``; then an existing ``<name>/`` is renamed aside, the new
one renamed into place, and only then the old one deleted.  A crash at any moment leaves either the
previous complete export or the new complete one under ``<name>/`` (or, between the two renames, the
previous one under ``.old-<name>/``, which the next export restores first).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from recall_dist.configtree import load_yaml
from recall_dist.constants import DTYPES
from recall_dist.io import fresh_dir, fsync_tree, publish_dir, restore_interrupted, temp_sibling
from recall_dist.train.config import train_config_from_dict

DEFAULT_SHARD_BYTES = 2 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


class ShardedSafetensorsWriter:
    """Appends tensors to numbered safetensors files of at most ``max_shard_bytes`` each."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # the tensor names of each written file
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.directory / f"part-{len(self.files):05d}.safetensors", metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, give the files their Hugging Face names and write the index."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        weight_map = {}
        for i, names in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(self.directory / f"part-{i:05d}.safetensors", self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_directory(
    hf_config,
    parameters: Iterable[tuple[str, torch.Tensor | None]],
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype,
    writer: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    generation_config=None,
    extra_files: dict[str, str] | None = None,
) -> Path | None:
    """Stream ``parameters`` ((name, full tensor) pairs; None where this process does not write) into a
    Hugging Face directory at ``out_dir``, atomically.  Every process must consume ``parameters`` (the
    gathers behind it are collective); only ``writer`` writes.  ``generation_config`` (stop ids) and
    ``extra_files`` (name -> text) are published with it."""
    out_dir = Path(out_dir)
    tmp = temp_sibling(out_dir)
    if writer:
        restore_interrupted(out_dir)  # a crash mid-publish left the previous export as .old-<name>
        fresh_dir(tmp)  # a crash mid-export may have left one
        shards = ShardedSafetensorsWriter(tmp, max_shard_bytes)
    for name, tensor in parameters:
        if writer:
            shards.add(name, tensor.to(dtype))
    if not writer:
        return None
    shards.close()
    hf_config.dtype = dtype  # what from_pretrained(dtype="auto") will pick
    hf_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    fsync_tree(tmp)
    publish_dir(tmp, out_dir)  # a complete export exists under <name>/ (or .old-<name>/) at every moment
    return out_dir


def base_generation_config(name_or_path: str | None):
    """The ``GenerationConfig`` of the pretrained model ``name_or_path`` (its ``generation_config.json``: stop
    ids, chat sampling defaults), None when there is no such file or no pretrained model (``model.config``).
    The export writes it next to the trained weights, so ``generate()`` stops where the base model's does."""
    if name_or_path is None:
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError:  # the base has no generation_config.json
        return None


def export_from_engine(
    engine,
    tokenizer,
    out_dir: str | Path,
    rank: int,
    dtype: str = "float32",
    generation_config=None,
    lora=None,
    base_model_name_or_path: str | None = None,
) -> Path | None:
    """Collective: every rank gathers the parameters one at a time, rank 0 writes ``out_dir`` (with
    ``generation_config``, e.g. ``base_generation_config(cfg.model.name_or_path)``, when given).

    With ``lora`` (``cfg.model.lora``): a peft adapter directory (``lora.write_adapter``, recording
    ``base_model_name_or_path``), or with ``lora.merge_on_export`` the merged model in Hugging Face format."""
    parameters = engine.full_parameters()
    if lora is not None and not lora.merge_on_export:
        from recall_dist.train.lora import write_adapter

        return write_adapter(
            engine.module.model,
            parameters,
            lora,
            out_dir,
            writer=rank == 0,
            base_model_name_or_path=base_model_name_or_path,
            tokenizer=tokenizer,
        )
    if lora is not None:
        from recall_dist.train.lora import merged_parameters

        parameters = merged_parameters(parameters, lora)
    return write_hf_directory(
        engine.module.model.config,
        parameters,
        tokenizer,
        out_dir,
        DTYPES[dtype],
        writer=rank == 0,
        generation_config=generation_config,
    )


def _checkpoint_parameters(engine_dir: Path, backend: str, model, trainable_only: bool = False):
    """(name, fp32 tensor) of a checkpoint's ``engine/`` directory, one parameter at a time (``trainable_only``:
    the parameters that train, all a LoRA checkpoint holds)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    names = list(dict.fromkeys(n for n, _ in named))  # tied: the first name only
    if backend == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag="engine", lazy_mode=True)
        for name in names:
            yield name, lazy[f"model.{name}"].contiguous().float()
        return
    import torch.distributed.checkpoint as dcp

    shapes = dict(model.named_parameters())
    for name in names:  # DCP reads only the requested keys
        tensor = torch.empty(shapes[name].shape, dtype=torch.float32)
        dcp.load({"model": {f"model.{name}": tensor}}, checkpoint_id=str(engine_dir), no_dist=True)
        yield name, tensor


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, merge: bool | None = None) -> Path:
    """Write the model of training checkpoint ``checkpoint_dir`` (``.../checkpoints/step_X``) and its
    tokenizer to ``out_dir`` in Hugging Face format (a LoRA run's in its ``final/`` form: the adapter
    directory, or the merged model; ``merge`` overrides ``model.lora.merge_on_export``: the sweep needs a
    model).  One process, no GPU; streamed like the final export."""
    from recall_dist.data import load_tokenizer
    from recall_dist.train.models import build_model

    checkpoint_dir = Path(checkpoint_dir)
    cfg = train_config_from_dict(load_yaml(checkpoint_dir / "config.yaml"))
    if cfg.model.lora is not None:
        if merge is not None:
            cfg.model.lora = dataclasses.replace(cfg.model.lora, merge_on_export=merge)
        return _export_lora_checkpoint(cfg, checkpoint_dir, out_dir)
    model = build_model(cfg.model, meta=True)
    parameters = _checkpoint_parameters(checkpoint_dir / "engine", cfg.backend.name, model)
    return write_hf_directory(
        model.config,
        parameters,
        load_tokenizer(cfg.model.tokenizer_name),
        out_dir,
        DTYPES[cfg.model.dtype],
        generation_config=base_generation_config(cfg.model.name_or_path),
    )


def _export_lora_checkpoint(cfg, checkpoint_dir: Path, out_dir: str | Path) -> Path:
    """A LoRA checkpoint holds the adapters only: ``out_dir`` is the adapter directory, or with
    ``model.lora.merge_on_export`` the merged model, whose base is read again from its source (the
    pretrained model, or the seeded initialisation of ``train.seed``)."""
    from recall_dist.data import load_tokenizer
    from recall_dist.train.lora import merged_parameters, write_adapter
    from recall_dist.train.models import build_model

    lora = cfg.model.lora
    model = build_model(cfg.model, meta=not lora.merge_on_export, seed=cfg.train.seed)
    adapters = dict(_checkpoint_parameters(checkpoint_dir / "engine", cfg.backend.name, model, trainable_only=True))
    from recall_dist.train.qlora import full_value  # a 4-bit base weight: its dequantised value

    parameters = ((n, adapters[n] if n in adapters else full_value(p).float()) for n, p in model.named_parameters())
    tokenizer = load_tokenizer(cfg.model.tokenizer_name)
    if not lora.merge_on_export:
        return write_adapter(
            model, parameters, lora, out_dir, base_model_name_or_path=cfg.model.name_or_path, tokenizer=tokenizer
        )
    return write_hf_directory(
        model.config,
        merged_parameters(parameters, lora),
        tokenizer,
        out_dir,
        DTYPES[cfg.model.dtype],
        generation_config=base_generation_config(cfg.model.name_or_path),
    )
