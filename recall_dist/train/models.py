"""Hugging Face causal LMs for training: built from a hub name, a local directory or a config dict
(random init, or on the meta device for planning), with the attention kernel chosen for the device.

In training the model never produces logits: ``decoder_of(model)`` gives the hidden states and the
loss head (``loss_head.py``) does the output matmul inside the fused loss.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from recall_dist.constants import DTYPES
from recall_dist.train.config import ModelConfig


def resolve_attn_implementation(requested: str = "auto", device_type: str | None = None) -> str:
    """``flash_attention_2`` when flash-attn is importable and we run on CUDA, else ``sdpa``."""
    if requested != "auto":
        return requested
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def model_config(cfg: ModelConfig):
    """The ``transformers`` config object of ``cfg`` (no weights loaded)."""
    from transformers import AutoConfig

    if cfg.config is not None:
        params = dict(cfg.config)
        return AutoConfig.for_model(params.pop("model_type"), **params)
    return AutoConfig.from_pretrained(cfg.name_or_path)


def build_model(
    cfg: ModelConfig, *, meta: bool = False, gradient_checkpointing: bool = False, device_type: str | None = None
) -> nn.Module:
    """The causal LM of ``cfg``: pretrained weights from ``name_or_path``, random init from ``config``
    (seed the RNG first for reproducible weights), or parameters on the meta device (``meta=True``)."""
    from transformers import AutoModelForCausalLM

    attn = resolve_attn_implementation(cfg.attn_implementation, device_type)
    dtype = DTYPES[cfg.dtype]
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype, attn_implementation=attn)
    elif cfg.config is not None:
        model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=attn)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


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
