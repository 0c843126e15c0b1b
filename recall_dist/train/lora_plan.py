"""LoRA in ``recall-dist plan`` (``train/memory_plan.py``): which modules get adapters, how many parameters
they add (exact, from the base model's shapes: r x (fan_in + fan_out) per adapted module), and what the
adapters keep for backward.  ``tests/train/test_lora_plan.py`` checks the count against real peft models."""

from __future__ import annotations

from torch import nn


def lora_targets(model: nn.Module, target_modules: str | list[str]) -> list[tuple[str, int, int]]:
    """``(module name, fan_in, fan_out)`` of every module peft's LoRA wraps in ``model`` (meta is fine), by
    peft's rules: a listed name matches a module by its last name component (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``); ``"all-linear"`` is every ``nn.Linear`` but the output head.  An
    embedding's adapter maps ``num_embeddings`` -> ``embedding_dim``."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    all_linear = isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    if isinstance(target_modules, str) and not all_linear:
        raise ValueError(f"model.lora.target_modules: {target_modules!r}: a list of module names or 'all-linear'")

    def matches(name: str, module: nn.Module) -> bool:
        if all_linear:
            return isinstance(module, nn.Linear) and module is not output
        return name.rsplit(".", 1)[-1] in target_modules

    targets = []
    for name, module in model.named_modules():
        if not name or not matches(name, module):
            continue
        if isinstance(module, nn.Linear):
            targets.append((name, module.in_features, module.out_features))
        elif isinstance(module, nn.Embedding):
            targets.append((name, module.num_embeddings, module.embedding_dim))
        else:
            kind = type(module).__name__
            raise ValueError(f"model.lora.target_modules: {name} is a {kind}, not nn.Linear / nn.Embedding")
    return targets


def lora_parameter_count(targets: list[tuple[str, int, int]], r: int) -> int:
    """Parameters LoRA adds (bias="none"): A [r, fan_in] and B [fan_out, r] per target."""
    return sum(r * (fan_in + fan_out) for _, fan_in, fan_out in targets)


def adapter_activation_bytes(cfg, targets, layers: int, tokens: int) -> float:
    """What the adapters keep for backward beyond the base model's activations (Korthikanti's count): per
    target the r-wide output of A, and with dropout the dropped copy of the input and its 1-byte mask (no
    dropout: A saves the input the base layer already produced).  Under gradient checkpointing only the
    layer being recomputed holds them."""
    lora, b = cfg.model.lora, cfg.backend
    low = 2 if b.bf16 else 4
    per_target = [tokens * (lora.r * low + (fan_in * (low + 1) if lora.dropout > 0 else 0)) for _, fan_in, _ in targets]
    total = sum(per_target)
    if cfg.train.gradient_checkpointing and layers > 0:
        return total / layers  # one decoder layer's share
    return total


def lora_split(cfg, model: nn.Module, seq_len: int) -> tuple[int, int, bool, dict[str, float]]:
    """(trainable, frozen, whether the head trains, the adapters' activation row) of a LoRA config: the
    closed form on the base model's shapes, checked against the adapted ``model`` the engine builds."""
    import dataclasses

    from recall_dist.train.lora import parameter_split
    from recall_dist.train.models import build_model, count_parameters

    lora = cfg.model.lora
    base = build_model(dataclasses.replace(cfg.model, lora=None), meta=True)
    targets = lora_targets(base, lora.target_modules)
    trainable, frozen = lora_parameter_count(targets, lora.r), count_parameters(base)
    if parameter_split(model) != (trainable, frozen):
        raise RuntimeError(
            f"LoRA count {trainable}, {frozen} differs from the adapted model's {parameter_split(model)}"
        )
    output = base.get_output_embeddings()
    head_grad = any(base.get_submodule(name) is output for name, _, _ in targets)
    tokens = seq_len * cfg.train.micro_batch_size
    layers = base.config.num_hidden_layers
    return trainable, frozen, head_grad, {"adapter activations": adapter_activation_bytes(cfg, targets, layers, tokens)}
