"""LoRA adapters (Hugging Face ``peft``) on a frozen base: everything ``model.lora`` changes lives here.

- ``apply_lora(model, lora)``: peft's own LoRA layers injected into the ``*ForCausalLM`` in place
  (``peft.inject_adapter_in_model``: no ``PeftModel`` wrapper, so ``decoder_of``, ``decoder_layers`` and the
  loss head see the model they know), every base parameter frozen, the adapters fp32.  Works on the meta
  device and under DeepSpeed's ``zero.Init``.
- Names: a base parameter keeps its Hugging Face name with ``.base_layer`` inserted
  (``model.layers.0.self_attn.q_proj.base_layer.weight``); an adapter is
  ``...q_proj.lora_A.default.weight`` (``is_adapter_parameter``).  ``base_parameter_name`` and
  ``adapter_key`` translate to the base checkpoint's and to peft's saved names.
- ``LoraWeightSource``: the initial weights (``weights.py``'s source protocol): the base from the base's
  source under its Hugging Face names, the adapters as peft initialises them (A Kaiming-uniform, B zero:
  the adapted model starts equal to the base), seeded per module, so any number of ranks starts alike.
- Export: ``write_adapter`` (``final/`` as a peft adapter directory, what ``PeftModel.from_pretrained``
  loads) and ``merged_parameters`` (the base + ``alpha / r * B A`` under the base's names, what
  ``AutoModelForCausalLM`` loads).
- ``parameter_split``: trainable (adapter) vs frozen (base) parameter counts of a (meta) model, for the
  planner.
- QLoRA (``quantize: 4bit``): the decoder layers' linear layers become bitsandbytes' ``Linear4bit`` before the
  adapters are injected (peft then wraps them with its own 4-bit LoRA layer); ``qlora.py`` has the rest.
  ``check_quantize_supported`` says where it runs.

The head: the loss head reads ``lm_head`` (or the tied embedding) itself (``loss_head.py``); it stays
frozen unless ``lm_head`` is in ``target_modules``, in which case ``widen_for_head_adapter`` turns the adapted
head into the one matmul the fused loss head runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from recall_dist.configtree import ConfigError
from recall_dist.train.weights import full_shape, module_seed

if TYPE_CHECKING:
    from recall_dist.train.config import LoraConfig

ADAPTER_NAME = "default"  # peft's adapter name; its saved keys leave it out
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_MODULES = ("lora_A", "lora_B")
_BASE = ".base_layer"


def peft_config(lora: LoraConfig, base_model_name_or_path: str | None = None, target_modules=None):
    """The ``peft.LoraConfig`` of ``lora`` (causal LM, no bias, Kaiming/zero init).  ``target_modules``: the
    resolved module names to record instead of ``lora.target_modules`` (an export writes what was adapted)."""
    _import_peft_offline()
    import peft

    targets = lora.target_modules if target_modules is None else sorted(target_modules)
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def apply_lora(model: nn.Module, lora: LoraConfig, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inject ``lora``'s adapters into ``model`` (a Hugging Face ``*ForCausalLM``, possibly on the meta device
    or partitioned by ``zero.Init``) in place and return it: the base frozen in the dtype it was built in, the
    adapters trainable in ``adapter_dtype``: fp32, the masters that FSDP2 and one process step; DeepSpeed
    passes its compute dtype and keeps the fp32 masters in its optimizer.  Their values are not
    initialised here: ``LoraWeightSource`` writes them with the base's.  A ``target_modules`` name that
    matches no linear layer is a ``ConfigError`` naming ``model.lora.target_modules``.  Over bitsandbytes'
    ``Linear4bit`` layers (QLoRA, ``qlora.replace_with_4bit``) peft injects its own 4-bit LoRA layer."""
    _import_peft_offline()
    from peft import inject_adapter_in_model

    from recall_dist.train.qlora import four_bit_layers

    config = peft_config(lora)
    config.init_lora_weights = False  # LoraWeightSource initialises (seeded, per module, on any sharding)
    four_bit = bool(four_bit_layers(model))
    try:
        if four_bit:  # what peft reads to dispatch its LoRA layer for bitsandbytes' Linear4bit
            model.is_loaded_in_4bit = True
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        raise ConfigError(
            "model.lora.target_modules",
            f"{lora.target_modules!r}: {str(e).splitlines()[0]} (linear layers of this model: "
            f"{', '.join(sorted(linear_module_names(model)))})",
        ) from None
    finally:
        if four_bit:
            del model.is_loaded_in_4bit
    _check_adapted(model, lora)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    for module in adapted_modules(model).values():
        for key in _ADAPTER_MODULES:
            layer = getattr(module, key)[ADAPTER_NAME]
            if layer.weight.dtype != adapter_dtype:
                layer.to(adapter_dtype)
    return model


def _check_adapted(model: nn.Module, lora: LoraConfig) -> None:
    """Only linear layers, and not a head tied to the embedding (the tie would have to be broken)."""
    key = "model.lora.target_modules"
    for name, module in adapted_modules(model).items():
        if not isinstance(module.get_base_layer(), nn.Linear) or module.lora_variant or any(module.lora_bias.values()):
            raise ConfigError(
                key, f"{lora.target_modules!r}: {name} is not a plain linear layer (LoRA on linear layers only)"
            )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head_adapter(head) is not None and getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(
            key,
            f"{lora.target_modules!r}: the output head of this model is tied to the input embedding "
            "(tie_word_embeddings); adapting lm_head is not supported there: leave it out",
        )


def linear_module_names(model: nn.Module) -> set[str]:
    """The last names of ``model``'s linear layers (what ``target_modules`` may list)."""
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer, for every adapted layer of ``model``."""
    _import_peft_offline()
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_model(model: nn.Module) -> bool:
    return bool(adapted_modules(model))


def is_adapter_parameter(name: str) -> bool:
    """True for an adapter's parameter name (``...q_proj.lora_A.default.weight``), False for a base one."""
    return any(f".{key}." in f".{name}" for key in _ADAPTER_MODULES)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that train (the adapters with LoRA; all of them without)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps (and holds state for): with LoRA, the adapters only."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_split(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of ``model`` (tied parameters once); works on the meta device, and
    counts a quantised 4-bit weight by the shape it stands for, not its packed bytes."""
    from recall_dist.train.qlora import is_quantized

    def numel(p: torch.Tensor) -> int:
        return math.prod(p.quant_state.shape if is_quantized(p) else full_shape(p))

    distinct = {id(p): p for p in model.parameters()}.values()
    trainable = sum(numel(p) for p in distinct if p.requires_grad)
    frozen = sum(numel(p) for p in distinct if not p.requires_grad)
    return trainable, frozen


def base_parameter_name(name: str) -> str:
    """A base parameter's Hugging Face name: ``...q_proj.base_layer.weight`` -> ``...q_proj.weight``."""
    return name.replace(f"{_BASE}.", ".")


def base_module_name(name: str) -> str:
    """A base module's Hugging Face name: ``...q_proj.base_layer`` -> ``...q_proj``."""
    return base_parameter_name(name + ".")[:-1]


def adapter_key(name: str) -> str:
    """peft's saved key of an adapter parameter (what ``adapter_model.safetensors`` holds):
    ``model.layers.0.self_attn.q_proj.lora_A.default.weight`` ->
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return "base_model.model." + name.replace(f".{ADAPTER_NAME}.", ".")


class LoraWeightSource:
    """Initial weights of a LoRA model (``weights.load_weights``'s source protocol): base parameters from
    ``base`` (a ``SafetensorsCheckpoint`` or ``RandomInit``) under their Hugging Face module names, adapters
    as peft initialises them: ``lora_A`` Kaiming-uniform (a = sqrt(5), nn.Linear's default), ``lora_B`` zero,
    from an RNG seeded by ``(seed, module name)``, on a CPU fp32 tensor of the full shape (the same values
    whatever the sharding)."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, int(seed)

    def readers(self, module_name: str, module: nn.Module, names: list[str]):
        leaf = module_name.rsplit(".", 2)
        if len(leaf) == 3 and leaf[1] in _ADAPTER_MODULES:
            return {
                n: self._adapter_reader(module_name, leaf[1], p) for n, p in module._parameters.items() if n in names
            }
        return self.base.readers(base_module_name(module_name), module, names)

    def _adapter_reader(self, module_name: str, kind: str, param: torch.Tensor):
        full = torch.zeros(full_shape(param))
        if kind == "lora_A":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(self.seed, module_name))
                nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        return lambda start, stop: full[start:stop]


def head_adapter(owner: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, float] | None:
    """``(lora_A, lora_B, dropout, scaling)`` when the output head ``owner`` is an adapted ``lm_head``
    (listed in ``target_modules``), else None (the head is frozen or trains whole)."""
    if not hasattr(owner, "lora_A"):  # every head without LoRA: no peft import (peft is an optional extra)
        return None
    _import_peft_offline()
    from peft.tuners.lora import LoraLayer

    if not isinstance(owner, LoraLayer) or ADAPTER_NAME not in owner.lora_A:
        return None
    return (
        owner.lora_A[ADAPTER_NAME],
        owner.lora_B[ADAPTER_NAME],
        owner.lora_dropout[ADAPTER_NAME],
        owner.scaling[ADAPTER_NAME],
    )


def widen_for_head_adapter(hidden: torch.Tensor, weight: torch.Tensor, adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapted head as one matmul: ``W x + s B A drop(x) = [W, B] [x; s A drop(x)]``, so the fused loss
    head (which takes one weight) runs it exactly, dropout included, and no V x H update is formed.
    ``hidden [..., H]``, ``weight [V, H]`` -> ``[..., H + r]``, ``[V, H + r]``."""
    lora_a, lora_b, dropout, scaling = adapter
    low_rank = scaling * lora_a(dropout(hidden.to(lora_a.weight.dtype)))
    return torch.cat([hidden, low_rank.to(hidden.dtype)], dim=-1), torch.cat(
        [weight, lora_b.weight.to(weight.dtype)], dim=1
    )


def merged_parameters(
    parameters: Iterable[tuple[str, torch.Tensor | None]], lora: LoraConfig
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(Hugging Face name, merged tensor) from a LoRA model's (name, full tensor) stream
    (``Engine.full_parameters``): each adapted weight becomes ``W + alpha / r * B A`` (in fp32; under QLoRA
    ``W`` is the dequantised 4-bit weight the stream carries, so the merge is ``W_deq + alpha / r * B A``), the rest
    passes under its base name; adapters are consumed, not yielded.  Holds one layer's weight until its
    ``lora_B`` arrives (peft registers ``base_layer``, ``lora_A``, ``lora_B`` in that order).  A ``None``
    tensor (a rank that does not write) stays ``None``."""
    pending: dict[str, tuple[str, torch.Tensor | None]] = {}  # module -> (base name, W)
    factors: dict[str, torch.Tensor | None] = {}  # module -> A
    for name, tensor in parameters:
        module, _, leaf = name.rpartition(".")
        if is_adapter_parameter(name):
            owner = module.rsplit(".", 2)[0]  # ...q_proj.lora_A.default -> ...q_proj
            if ".lora_A." in f"{name}":
                factors[owner] = tensor
                continue
            base_name, weight = pending.pop(owner)
            a = factors.pop(owner)
            if weight is not None:
                weight = weight.float() + lora.scaling * (tensor.float() @ a.float())
            yield base_name, weight
        elif module.endswith(_BASE) and leaf == "weight":
            pending[module[: -len(_BASE)]] = (base_parameter_name(name), tensor)
        else:
            yield base_parameter_name(name), tensor
    if pending:
        raise RuntimeError(f"merged_parameters: adapted weights without their adapters: {sorted(pending)}")


def adapter_parameters(
    parameters: Iterable[tuple[str, torch.Tensor | None]],
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(peft key, tensor) of the adapters in a LoRA model's (name, full tensor) stream; base parameters are
    consumed (every rank must consume the whole stream: its gathers are collective) and dropped."""
    for name, tensor in parameters:
        if is_adapter_parameter(name):
            yield adapter_key(name), tensor


def write_adapter(
    model: nn.Module,
    parameters: Iterable[tuple[str, torch.Tensor | None]],
    lora: LoraConfig,
    out_dir: str | Path,
    writer: bool = True,
    base_model_name_or_path: str | None = None,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
) -> Path | None:
    """``out_dir`` as a peft adapter directory, atomically (``io.publish_dir``): ``adapter_config.json``
    (``peft_config`` with the modules actually adapted in ``model``) and ``adapter_model.safetensors``
    (the adapters of ``parameters`` in fp32 under peft's keys), plus the tokenizer.  Every process consumes
    ``parameters``; only ``writer`` writes.  ``PeftModel.from_pretrained(base, out_dir)`` loads it."""
    from safetensors.torch import save_file

    from recall_dist.io import fresh_dir, fsync_tree, publish_dir, restore_interrupted, temp_sibling

    out_dir = Path(out_dir)
    tensors = dict(adapter_parameters(parameters))
    if not writer:
        return None
    tmp = temp_sibling(out_dir)
    restore_interrupted(out_dir)
    fresh_dir(tmp)
    save_file({k: t.float().contiguous() for k, t in tensors.items()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    targets = {name.rsplit(".", 1)[-1] for name in adapted_modules(model)}
    peft_config(lora, base_model_name_or_path, target_modules=targets).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    fsync_tree(tmp)
    publish_dir(tmp, out_dir)
    return out_dir


def load_merged(directory: str | Path, dtype="auto", base: str | None = None):
    """The model of a peft adapter directory (a LoRA run's ``final/``): its base
    (``base_model_name_or_path``, or ``base``) with the adapter merged in, as a plain ``*ForCausalLM``."""
    _import_peft_offline()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base or read_adapter_config(directory).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, directory).merge_and_unload()


def read_adapter_config(directory: str | Path) -> dict:
    """The ``adapter_config.json`` of a peft adapter directory, as a dict."""
    return json.loads((Path(directory) / ADAPTER_CONFIG).read_text())


def _import_peft_offline() -> None:
    """peft imports bitsandbytes when it is installed, and bitsandbytes' import may ask the hub for a CPU
    kernel: import it first without network access (``qlora.import_bitsandbytes``)."""
    from recall_dist.train.qlora import import_bitsandbytes

    import_bitsandbytes()


def check_quantize_backend(lora: LoraConfig | None, backend) -> None:
    """``quantize: 4bit`` under DeepSpeed ZeRO-3 is a ``ConfigError`` naming ``model.lora.quantize`` (one line):
    stage 3 partitions every parameter, and bitsandbytes' packed 4-bit weights (with their quantisation
    statistics outside the tensor) cannot be partitioned and gathered back.  FSDP2 and ZeRO-2 keep the 4-bit
    base whole on every rank."""
    if lora is None or lora.quantize is None or backend is None:
        return
    if backend.name == "deepspeed" and backend.zero_stage == 3:
        raise ConfigError(
            "model.lora.quantize",
            f"{lora.quantize!r} (QLoRA) does not run under DeepSpeed ZeRO-3, which partitions every parameter "
            "and cannot partition bitsandbytes' 4-bit weights: use backend.name=fsdp2 or backend.zero_stage=2",
        )


def check_quantize_supported(lora: LoraConfig | None, backend=None, device_type: str | None = None) -> None:
    """Where ``quantize: 4bit`` (QLoRA) runs, checked when a run starts (``resources.validate_resources``), not
    when the config is built (a saved config stays readable on any machine): a one-line ``ConfigError``
    naming ``model.lora.quantize`` without bitsandbytes, under ZeRO-3 (``check_quantize_backend``), or on a CPU
    with a bitsandbytes older than 0.48 (no CPU backend).  On CPU (``device_type``, default: CUDA when
    available) it runs, with a one-line warning: 4 bits there save memory, not time."""
    if lora is None or lora.quantize is None:
        return
    from recall_dist.train import qlora

    check_quantize_backend(lora, backend)
    if not qlora.bitsandbytes_available():
        raise ConfigError(
            "model.lora.quantize",
            f"{lora.quantize!r} (QLoRA) needs bitsandbytes, which is not installed: pip install bitsandbytes "
            "(or set model.lora.quantize=null)",
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cpu":
        found = qlora.bitsandbytes_version()
        if found < qlora.MIN_CPU_VERSION:
            need = ".".join(map(str, qlora.MIN_CPU_VERSION))
            raise ConfigError(
                "model.lora.quantize",
                f"{lora.quantize!r} (QLoRA) on CPU needs bitsandbytes >= {need} (its CPU backend); this is "
                f"{'.'.join(map(str, found))}: pip install -U bitsandbytes, or run on a CUDA GPU",
            )
        logging.getLogger(__name__).warning(
            "model.lora.quantize=%s on CPU: the 4-bit base saves memory, not time (bitsandbytes dequantises "
            "every weight for each matmul)",
            lora.quantize,
        )
