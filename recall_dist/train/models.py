"""Hugging Face causal LMs for training, built without a full copy per rank.

``build_model(cfg, meta=True)`` builds the architecture on the meta device (no memory): what the
backends shard, the planner counts and the exporter fills.  ``build_model(cfg)`` materialises it in
one process: the same construction, then every parameter written from the model's weight source
(``weights.py``): the pretrained safetensors of ``name_or_path``, or the seeded per-module
initialisation for ``config`` models.  So a one-process model and a sharded one start from the same
weights for the same seed.

In training the model never produces logits: ``decoder_of(model)`` gives the hidden states and the
loss head (``loss_head.py``) does the output matmul inside the fused loss.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from recall_dist.train.weights import RandomInit, SafetensorsCheckpoint, load_weights, reset_buffers

if TYPE_CHECKING:
    from recall_dist.train.config import ModelConfig


def resolve_attn_implementation(requested: str = "auto", device_type: str | None = None) -> str:
    """``flash_attention_2`` when flash-attn is importable and we run on CUDA, else ``sdpa``."""
    if requested != "auto":
        return requested
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def construct(
    cfg: ModelConfig, dtype: torch.dtype, device_type: str | None = None, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """The architecture of ``cfg`` built in the current device context (meta, or inside DeepSpeed's
    ``zero.Init``), with Hugging Face's weight initialisation skipped: weights come from ``load_weights``.
    With ``cfg.lora`` the adapters are injected (in ``adapter_dtype``, default fp32) and the base frozen
    (``lora.apply_lora``); with ``cfg.lora.quantize`` the decoder layers' linear layers become 4-bit layers
    first (``qlora.replace_with_4bit``, computing in ``dtype``; quantised by ``qlora.quantize_base`` once the
    weights are loaded)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    attn = resolve_attn_implementation(cfg.attn_implementation, device_type)
    with no_init_weights():  # (which also skips the tying done by post_init: tie explicitly)
        model = AutoModelForCausalLM.from_config(cfg.hf_config(), dtype=dtype, attn_implementation=attn)
    model.tie_weights()
    model.config.use_cache = False
    if cfg.lora is not None:  # peft's adapters injected in place, the base frozen (train/lora.py)
        from recall_dist.train.lora import apply_lora

        if cfg.lora.quantize is not None:
            from recall_dist.train.qlora import replace_with_4bit

            replace_with_4bit(decoder_layers(model), dtype)
        apply_lora(model, cfg.lora, adapter_dtype or torch.float32)
    return model


def _model_dir_like(name: str) -> str | None:
    """A local model (or tokenizer) directory whose name is a near miss of ``name`` (a typo:
    ``my-modle`` for ``my-model``), or None.  Only directories holding a ``config.json`` or a
    tokenizer's files count, so a hub name is never taken for a local path because some unrelated
    folder looks like it."""
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not parent.is_dir():
        return None
    marks = ("config.json", "tokenizer_config.json", "recall_dist_tokenizer.json")
    models = [p.name for p in parent.iterdir() if p.is_dir() and any((p / m).is_file() for m in marks)]
    match = difflib.get_close_matches(path.name, models, n=1, cutoff=0.85)
    return str(parent / match[0]) if match else None


def check_model_path(name_or_path: str, key: str = "model.name_or_path") -> None:
    """A ``name_or_path`` that looks local (``data.sources.looks_local``: ``./x``, ``/x``, ``~/x``,
    ``a/b/c``, ``models/x`` with ``models/`` a local directory), or that is a near miss of a local
    model directory's name, must be an existing directory: a typo fails here as a ``ConfigError``
    naming ``key``, before any request to the hub."""
    from recall_dist.configtree import ConfigError
    from recall_dist.data.sources import looks_local

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    near = _model_dir_like(name_or_path)
    if not (looks_local(name_or_path) or near):
        return  # a hub name: the hub client resolves it
    problem = "is a file, not a model directory" if path.exists() else "no such local directory"
    hint = f"; did you mean {near!r}?" if near else ""
    raise ConfigError(key, f"{name_or_path!r}: {problem}{hint} (a hub model is named 'org/name')")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (hub clients write several, with URLs and advice)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def checkpoint_directory(name_or_path: str) -> Path:
    """A local directory holding ``name_or_path``'s safetensors: the path itself, or the Hugging Face
    cache's snapshot of a hub model (downloaded by ``huggingface_hub`` where the network allows)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))


def weight_source(cfg: ModelConfig, model: nn.Module, seed: int):
    """Where ``model``'s initial weights come from: pretrained safetensors, or the seeded initialisation."""
    if cfg.name_or_path is not None:
        source = SafetensorsCheckpoint(checkpoint_directory(cfg.name_or_path))
    else:
        source = RandomInit(model, seed)
    if cfg.lora is not None:  # the base under its Hugging Face names, the adapters as peft initialises them
        from recall_dist.train.lora import LoraWeightSource

        source = LoraWeightSource(source, seed)
    return source


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(
    cfg: ModelConfig,
    *,
    meta: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    device_type: str | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The causal LM of ``cfg`` in ``dtype`` (LoRA adapters in ``adapter_dtype``, default fp32): on the meta
    device (``meta=True``), or materialised on ``device`` with its weights from ``weight_source``
    (pretrained, or initialised from ``seed``; under QLoRA the 4-bit base then quantised on ``device``)."""
    with torch.device("meta"):
        model = construct(cfg, dtype, device_type or torch.device(device).type, adapter_dtype)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if meta:
        return model
    materialize(model, device)
    load_weights(model, weight_source(cfg, model, seed))
    quantize_if_4bit(model, device)
    return model


def quantize_if_4bit(model: nn.Module, device: str | torch.device) -> None:
    """Quantise the 4-bit layers of a QLoRA model (after ``load_weights``), on ``device``; nothing otherwise."""
    from recall_dist.train.qlora import four_bit_layers, quantize_base

    if four_bit_layers(model):
        quantize_base(model, device)


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """Allocate the meta (or FSDP2-sharded meta) parameters on ``device``, uninitialised, and recompute
    the buffers.  ``to_empty`` replaces each module's parameters, which unties shared ones: re-tie."""
    model.to_empty(device=device)
    model.tie_weights()
    reset_buffers(model)


def decoder_of(model: nn.Module) -> nn.Module:
    """The base model that maps input ids to final hidden states (``LlamaModel`` in ``LlamaForCausalLM``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None:
        raise TypeError(f"{type(model).__name__}: cannot find the decoder (no get_decoder() / .model)")
    return decoder


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (what FSDP2 shards one by one and the planner measures)."""
    layers = getattr(decoder_of(model), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: decoder has no .layers")
    return list(layers)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once); works on the meta device."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
