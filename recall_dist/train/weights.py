"""Initial weights written straight into each rank's shards: no rank ever holds the full model.

A *source* says what a parameter's full value is, row by row; ``load_weights`` walks the model one
module at a time and writes into every parameter only the rows this rank stores:

- a plain tensor (one process, ZeRO-2): every row;
- an FSDP2 ``DTensor`` sharded on dim 0: the rows of this rank's shard;
- a ZeRO-3 partitioned parameter: the rows covering this rank's slice of the flattened tensor.

Two sources:

- ``RandomInit(model, seed)``: Hugging Face's own per-module initialisation (``model._init_weights``)
  applied to a CPU twin of one module at a time, the RNG seeded from ``(seed, module name)``.  The
  weights depend only on the seed and the architecture -- not on the number of ranks, the backend or
  the order modules are visited -- so 1, 2 or 8 processes start from the same model.
- ``SafetensorsCheckpoint(directory)``: a Hugging Face directory with ``model.safetensors`` or sharded
  ``model-*.safetensors`` + ``model.safetensors.index.json``.  Each rank reads only its own rows of
  each tensor (``pread`` of their byte range), so host memory stays near one rank's shards.

Parameters shared by two modules (tied embeddings) are written once, by their first owner.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

RowReader = Callable[[int, int], torch.Tensor]  # rows [start, stop) of the full tensor (all rows for 0-D)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed from (run seed, module name): stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(param: torch.Tensor) -> torch.Size:
    """The logical shape of a parameter, whether plain, a DTensor or a ZeRO-3 partition."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def owned_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """(module name, module, its direct parameters not owned by an earlier module), in module order."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module._parameters.items() if p is not None and id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            yield name, module, own


def _init_twin(module: nn.Module, parameters: dict, buffers: dict) -> nn.Module:
    """A shallow copy of ``module`` (same class, so ``_init_weights`` dispatches the same way) with these
    parameters and buffers and no children, for ``_init_weights`` to write into."""
    twin = copy.copy(module)
    twin._parameters, twin._buffers, twin._modules = parameters, buffers, {}
    return twin


class RandomInit:
    """Hugging Face's initialisation of ``model``'s architecture, one module at a time, seeded per module."""

    def __init__(self, model: nn.Module, seed: int):
        if not hasattr(model, "_init_weights"):
            raise TypeError(f"{type(model).__name__} has no _init_weights: not a Hugging Face PreTrainedModel")
        self.model, self.seed = model, int(seed)

    def readers(self, module_name: str, module: nn.Module, names: list[str]) -> dict[str, RowReader]:
        # A CPU twin with fresh fp32 parameters of the full shape (the real module may be on meta, sharded or
        # partitioned) and CPU copies of the buffers: _init_weights may set them (Gemma 3's embed_scale) but
        # must not touch the real ones here (``reset_buffers`` owns those).
        own = module._parameters
        twin = _init_twin(
            module,
            {n: nn.Parameter(torch.empty(full_shape(p))) if n in names else None for n, p in own.items()},
            {n: None if b is None else torch.zeros(b.shape, dtype=b.dtype) for n, b in module._buffers.items()},
        )
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(module_seed(self.seed, module_name))
            self.model._init_weights(twin)
        values = {n: twin._parameters[n].detach() for n in names}
        return {n: _row_reader(values[n]) for n in names}


def _row_reader(full: torch.Tensor) -> RowReader:
    return lambda start, stop: full if full.dim() == 0 else full[start:stop]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """Row-range reads from one ``.safetensors`` file with ``pread``: only the requested bytes are read, and
    nothing is memory-mapped (mapped file pages would count towards this process's resident memory)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.base = 8 + size
        self.tensors = header

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        info = self.tensors[key]
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        if not shape:
            start, stop, row_bytes, rows_shape = 0, 1, end - begin, []
        else:
            start, stop = max(0, start), min(stop, shape[0])
            row_bytes, rows_shape = (end - begin) // max(shape[0], 1), [max(stop - start, 0), *shape[1:]]
        buffer = bytearray(max(stop - start, 0) * row_bytes)
        with open(self.path, "rb", buffering=0) as f:
            view, offset = memoryview(buffer), self.base + begin + start * row_bytes
            while view:  # pread may return fewer bytes than asked
                n = os.preadv(f.fileno(), [view], offset)
                if n == 0:
                    raise OSError(f"{self.path}: truncated file (tensor {key!r})")
                view, offset = view[n:], offset + n
        if not buffer:
            return torch.empty(rows_shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(rows_shape)


class SafetensorsCheckpoint:
    """Row-wise reads from a Hugging Face safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SAFETENSORS_SINGLE).is_file():
            weight_map = dict.fromkeys(SafetensorsFile(self.directory / SAFETENSORS_SINGLE).tensors, SAFETENSORS_SINGLE)
        else:
            raise FileNotFoundError(
                f"{self.directory}: no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE} (recall_dist loads Hugging Face "
                "safetensors checkpoints; convert .bin weights with save_pretrained(..., safe_serialization=True))"
            )
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, SafetensorsFile] = {}

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:  # headers only: a few KB per file
            self._files[filename] = SafetensorsFile(self.directory / filename)
        return self._files[filename]

    def readers(self, module_name: str, module: nn.Module, names: list[str]) -> dict[str, RowReader]:
        out = {}
        for name in names:
            key = f"{module_name}.{name}" if module_name else name
            if key not in self.weight_map:
                raise KeyError(f"{self.directory}: the checkpoint has no tensor {key!r} (needed by the model)")
            out[name] = self._reader(key)
        return out

    def _reader(self, key: str) -> RowReader:
        return lambda start, stop: self._file(self.weight_map[key]).read_rows(key, start, stop)


def _write_rows(dest: torch.Tensor, reader: RowReader, start: int, stop: int) -> None:
    if stop > start:
        dest.copy_(reader(start, stop).to(dest.dtype))


def write_parameter(param: torch.Tensor, reader: RowReader) -> None:
    """Write this rank's part of ``param``'s full value (rows from ``reader``) into its storage."""
    shape = full_shape(param)
    if hasattr(param, "ds_tensor"):  # ZeRO-3: rank r stores flat[r * p : (r + 1) * p] (zero-padded tail)
        import torch.distributed as dist

        part = param.ds_tensor.data
        numel, size = param.ds_numel, part.numel()
        start = size * dist.get_rank(group=param.ds_process_group)
        stop = min(start + size, numel)
        if stop <= start:
            return
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // cols, -(-stop // cols)
        flat = reader(first, last).reshape(-1)[start - first * cols : stop - first * cols]
        part[: stop - start].copy_(flat.to(part.dtype))
        return
    if hasattr(param, "device_mesh"):  # FSDP2 DTensor: Shard(0) over the mesh
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        local_shape, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, param.placements)
        if any(offset[1:]):
            raise NotImplementedError(f"only dim-0 sharding is supported, got placements {param.placements}")
        with torch.no_grad():
            _write_rows(local.data.view(local_shape), reader, offset[0], offset[0] + local_shape[0])
        return
    with torch.no_grad():
        if param.dim() == 0:
            param.data.copy_(reader(0, 0).to(param.dtype))
        else:
            _write_rows(param.data, reader, 0, shape[0])


def load_weights(model: nn.Module, source) -> int:
    """Fill every parameter of ``model`` from ``source`` (this rank's part only).  Returns the number of
    parameter tensors written.  Collective-free: every rank reads its own rows."""
    count = 0
    for name, module, own in owned_parameters(model):
        readers = source.readers(name, module, [n for n, _ in own])
        for n, param in own:
            write_parameter(param, readers[n])
            count += 1
    return count


def reset_buffers(model: nn.Module) -> None:
    """Recompute the buffers after ``to_empty`` (which leaves them uninitialised) with Hugging Face's
    ``_init_weights``: the rotary ``inv_freq`` of modules without parameters, and the buffers of modules
    that also own parameters (Gemma 3's embedding scales its output by a non-persistent ``embed_scale``:
    left uninitialised, every logit was equal and every gradient NaN).  A module with parameters is
    re-initialised through a twin whose parameters are meta stand-ins, so its real parameters (loaded
    or about to be) are never written."""
    with torch.no_grad():
        for module in model.modules():
            if not any(b is not None for b in module._buffers.values()):
                continue
            if not module._parameters:
                model._init_weights(module)
                continue
            meta = {
                n: None if p is None else nn.Parameter(torch.empty(full_shape(p), device="meta"), p.requires_grad)
                for n, p in module._parameters.items()
            }
            model._init_weights(_init_twin(module, meta, module._buffers))  # the real buffers, written in place
