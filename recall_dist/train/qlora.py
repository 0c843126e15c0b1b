"""QLoRA (``model.lora.quantize: 4bit``): the frozen base's decoder-layer linear layers stored in 4 bits
through bitsandbytes (NF4, double quantisation), the LoRA adapters on top of them trained as usual.

The model is built in three moves, each where the backends already do the matching step for plain LoRA:

1. ``replace_with_4bit`` (``models.construct``, on the meta device): every ``nn.Linear`` inside the decoder
   layers (the attention and MLP projections; never the embedding nor ``lm_head``: the loss head owns the
   head matmul and keeps it in the compute dtype) becomes a ``bitsandbytes.nn.Linear4bit`` whose compute
   dtype is the dtype the model is built in.  peft then wraps those layers with its own 4-bit LoRA layer
   (``peft.tuners.lora.bnb.Linear4bit``) when ``lora.apply_lora`` injects the adapters.
2. The weights are written as for LoRA (``weights.load_weights``): the base layers hold their full-precision
   rows for now (materialising a meta ``Params4bit`` leaves a plain parameter of the build dtype).
3. ``quantize_base`` (after the weights are loaded): each of those weights becomes a quantised
   ``Params4bit`` on the training device, frozen.

Every rank holds the whole 4-bit base (FSDP2 leaves it out of sharding through ``fully_shard``'s
``ignored_params``; ZeRO-2 replicates it like any frozen parameter); ZeRO-3, which partitions every
parameter, is refused (``check_quantize_supported`` in ``lora.py``).  Checkpoints hold the adapters only: the
4-bit base is rebuilt (and quantised again, deterministically) from the model's source.

bitsandbytes is imported through ``import_bitsandbytes``: on CPUs with AVX512-BF16 its import asks the
Hugging Face hub for an optional CPU kernel (``kernels-community/quantization-bitsandbytes``), a network
request; the ``kernels`` package is hidden during that import, so bitsandbytes takes its own CPU kernels and
no request is made.
"""

from __future__ import annotations

import logging
import math
import sys

import torch
from torch import nn

QUANT_TYPE = "nf4"
BLOCKSIZE = 64  # bitsandbytes' NF4 block (elements per absmax)
NESTED_BLOCKSIZE = 256  # double quantisation: blocks of absmax values per fp32 scale
# Per quantised weight, whatever its size: the NF4 code (16 fp32), the 8-bit dynamic code of the nested
# quantisation (256 fp32) and its offset (one fp32).
PER_TENSOR_BYTES = 16 * 4 + 256 * 4 + 4
MIN_CPU_VERSION = (0, 48)  # bitsandbytes runs NF4 on CPU from 0.48 on

_MISSING = object()


def bitsandbytes_available() -> bool:
    """True when bitsandbytes imports (``import_bitsandbytes``)."""
    return import_bitsandbytes() is not None


def import_bitsandbytes():
    """``bitsandbytes``, imported without any network request (see the module docstring); None when it does
    not import (not installed).  Idempotent; peft imports bitsandbytes itself when it is installed, so the
    LoRA code calls this before importing peft."""
    if sys.modules.get("bitsandbytes") is not None:
        return sys.modules["bitsandbytes"]
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` fails at once: bitsandbytes' fallback
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)  # its warning about the missing hub kernel
    try:
        import bitsandbytes
    except ImportError:
        return None
    finally:
        cpu_log.setLevel(level)
        if saved is _MISSING:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    return bitsandbytes


def bitsandbytes_version() -> tuple[int, ...]:
    from importlib.metadata import version

    parts = []
    for piece in version("bitsandbytes").split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def decoder_linears(layers: list[nn.Module]):
    """(owner module, attribute, linear) of every ``nn.Linear`` (or ``Linear4bit``) inside the decoder layers
    ``layers`` (``models.decoder_layers``), whether bare or the ``base_layer`` of a peft LoRA layer."""
    for layer in layers:
        for name, module in layer.named_modules():
            for attr, child in module.named_children():
                if isinstance(child, nn.Linear) and not _is_adapter_linear(name):
                    yield module, attr, child


def _is_adapter_linear(owner_name: str) -> bool:
    """peft's ``lora_A.default`` / ``lora_B.default`` linear layers (the adapters: never quantised)."""
    return owner_name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def replace_with_4bit(layers: list[nn.Module], dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` inside the decoder layers ``layers`` (``models.decoder_layers``) by a
    ``bitsandbytes.nn.Linear4bit`` (NF4, double quantisation, compute dtype ``dtype``) of the same shape, on
    the device of the linear it replaces (the meta device when the model is built), in place, before peft
    injects its adapters.  Returns the number of layers replaced."""
    bnb = import_bitsandbytes()
    count = 0
    for owner, attr, linear in list(decoder_linears(layers)):
        if isinstance(linear, bnb.nn.Linear4bit):
            continue
        four_bit = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type=QUANT_TYPE,
            device=linear.weight.device,
        )
        with torch.no_grad():  # the not-yet-quantised weight holds the base rows in the build dtype
            four_bit.weight.data = four_bit.weight.data.to(dtype)
            if four_bit.bias is not None:
                four_bit.bias.data = four_bit.bias.data.to(dtype)
        # bitsandbytes repacks a CPU layer's weights in place for inference (eval mode, no gradient) on
        # AVX512-BF16 machines (and fails on layers narrower than its block): the frozen base keeps one layout
        # and its bytes, in evaluation too.
        four_bit.support_avx512bf16_for_cpu = False
        four_bit.requires_grad_(False)
        setattr(owner, attr, four_bit)
        count += 1
    return count


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> ``Linear4bit`` of every 4-bit layer of ``model`` (empty without QLoRA, and without
    importing bitsandbytes when it is not loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def four_bit_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of ``model``'s 4-bit layers (the weights and any bias): what FSDP2 must not shard."""
    return {p for layer in four_bit_layers(model).values() for p in layer.parameters()}


def quantize_base(model: nn.Module, device: str | torch.device) -> int:
    """Quantise, on ``device``, every 4-bit layer's weight still held in full precision (after
    ``load_weights``), in place: the weight becomes a frozen NF4 ``Params4bit`` (double quantisation) and
    the full-precision rows are freed; a bias moves to ``device`` in its dtype.  Returns the number of weights
    quantised."""
    bnb = import_bitsandbytes()
    count = 0
    for layer in four_bit_layers(model).values():
        weight = layer.weight
        if isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized:
            continue
        layer.weight = bnb.nn.Params4bit(
            weight.data.contiguous(),
            requires_grad=False,
            compress_statistics=True,
            quant_type=QUANT_TYPE,
            blocksize=BLOCKSIZE,
            module=layer,
        ).to(device)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data.to(device), requires_grad=False)
        count += 1
    return count


def is_quantized(param: torch.Tensor) -> bool:
    """True for a quantised 4-bit weight (packed bytes, not its values)."""
    return bool(getattr(param, "bnb_quantized", False)) and getattr(param, "quant_state", None) is not None


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """The values a quantised 4-bit weight stands for (``W_deq``, in its quantisation's dtype), full shape."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(param.data, param.quant_state)


def full_value(param: torch.Tensor) -> torch.Tensor:
    """``param``'s values: the dequantised weight of a 4-bit layer, else the tensor itself."""
    return dequantized(param) if is_quantized(param) else param.detach()


def four_bit_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that makes up ``model``'s 4-bit base (packed weights, absmax, nested absmax, codes,
    offsets), by name, cloned to CPU: two calls compare bit for bit."""
    out = {}
    for name, layer in four_bit_layers(model).items():
        weight, state = layer.weight, layer.weight.quant_state
        tensors = {"weight": weight.data, "absmax": state.absmax, "code": state.code}
        if state.nested:
            tensors.update(offset=state.offset, nested_absmax=state.state2.absmax, nested_code=state.state2.code)
        if layer.bias is not None:
            tensors["bias"] = layer.bias
        out.update({f"{name}.{key}": t.detach().cpu().clone() for key, t in tensors.items()})
    return out


def drop_four_bit_state(state: dict, model: nn.Module) -> dict:
    """``state`` (a module state dict) without the entries of ``model``'s 4-bit layers (their weights and the
    quantisation statistics bitsandbytes adds to a state dict): a QLoRA checkpoint holds the adapters only."""
    prefixes = tuple(f"{name}." for name in four_bit_layers(model))
    if prefixes:
        for key in [k for k in state if k.startswith(prefixes)]:
            state.pop(key)
    return state


# ---------------------------------------------------------------------------------------------------------
# Memory (recall-dist plan)


def four_bit_bytes(numel: int) -> int:
    """Bytes bitsandbytes allocates for one NF4 weight of ``numel`` elements with double quantisation:
    the packed values (two per byte), one 8-bit absmax per block of 64, one fp32 scale per 256 of those
    blocks, plus per tensor the NF4 code (16 fp32), the nested quantisation's code (256 fp32) and offset
    (one fp32): about 0.516 byte per parameter."""
    blocks = math.ceil(numel / BLOCKSIZE)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + PER_TENSOR_BYTES


def four_bit_split(layers: list[nn.Module]) -> tuple[int, int, int]:
    """(4-bit weight elements, their bytes at rest, bias elements kept in full precision) of the linear layers
    inside the decoder layers ``layers`` (``models.decoder_layers`` of a model without adapters; meta is
    fine): what ``quantize: 4bit`` stores in 4 bits."""
    numel = nbytes = bias = 0
    for _, _, linear in decoder_linears(layers):
        n = linear.weight.numel()
        numel, nbytes = numel + n, nbytes + four_bit_bytes(n)
        bias += linear.bias.numel() if linear.bias is not None else 0
    return numel, nbytes, bias
