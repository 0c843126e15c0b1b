"""Thin wrappers over the ``torch.distributed`` collectives the loss uses, with ``None`` meaning
"not distributed", plus a byte counter so tests can measure what crosses each group.

Every collective of the loss goes through here: that is what makes the communication budget
(O(1) numbers per token over the TP group, never a slice of the vocabulary) measurable.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

_COUNTERS: list[CommCounter] = []


class CommCounter:
    """Counts collectives and payload bytes per process group while active.

    >>> with CommCounter() as c:
    ...     out = vocab_parallel_loss(...)
    >>> c.bytes[tp_group], c.calls[tp_group]
    """

    def __init__(self) -> None:
        self.bytes: dict = defaultdict(int)
        self.calls: dict = defaultdict(int)

    def record(self, group, nbytes: int) -> None:
        self.bytes[group] += nbytes
        self.calls[group] += 1

    def __enter__(self) -> CommCounter:
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _COUNTERS.remove(self)


def _record(group, tensor: torch.Tensor) -> None:
    for c in _COUNTERS:
        c.record(group, tensor.numel() * tensor.element_size())


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce (``op`` in {"sum", "max"}); a no-op when ``group`` is None or size 1."""
    if group_size(group) == 1:
        return tensor
    _record(group, tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


def all_gather_cat(values: torch.Tensor, group) -> torch.Tensor:
    """Concatenate 1-D ``values`` of the same length from every rank, in rank order (one collective)."""
    world = group_size(group)
    if world == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(world)]
    _record(group, values)
    dist.all_gather(parts, values, group=group)
    return torch.cat(parts)


def all_gather_varlen(values: torch.Tensor, group) -> torch.Tensor:
    """Concatenate 1-D ``values`` of possibly different lengths from every rank, in rank order.

    Two collectives: the lengths, then the values padded to the longest.
    """
    world = group_size(group)
    if world == 1:
        return values
    n = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    _record(group, n)
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros(longest, device=values.device, dtype=values.dtype)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    _record(group, padded)
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=False)])
