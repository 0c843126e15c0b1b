"""``step_token_count``: the one rule (``recall-dist train`` and the Hugging Face Trainer) for a step's N,
against a naive count: shifted labels that are not -100 (and, with ``mask_sequence_starts``, not at a
``position_ids == 0``), summed over micro-batches and over a 2-process gloo group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.losses.accumulator import step_token_count


def micro_batches(seed: int, n: int = 3, rows: int = 2, width: int = 9) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 50, (rows, width), generator=g)
        labels[torch.rand(rows, width, generator=g) < 0.3] = -100
        position_ids = torch.stack([torch.cat([torch.arange(4), torch.arange(width - 4)]) for _ in range(rows)])
        out.append({"labels": labels, "position_ids": position_ids})
    return out


def naive(batches, mask_sequence_starts: bool = False) -> int:
    total = 0
    for b in batches:
        for r in range(b["labels"].shape[0]):
            for t in range(1, b["labels"].shape[1]):
                starts = mask_sequence_starts and int(b["position_ids"][r, t]) == 0
                total += int(b["labels"][r, t]) != -100 and not starts
    return total


def test_matches_naive_count():
    batches = micro_batches(0)
    assert step_token_count(batches, None) == naive(batches)
    assert step_token_count(batches, None, mask_sequence_starts=True) == naive(batches, True)
    assert naive(batches, True) < naive(batches)  # the flag matters on this data
    # the first column is never a target (shift); a custom ignore_index
    shifted = [{"labels": torch.tensor([[5, -1, 3, -1]])}]
    assert step_token_count(shifted, None, ignore_index=-1) == 1.0
    # without position_ids the flag changes nothing
    assert step_token_count(shifted, None, ignore_index=-1, mask_sequence_starts=True) == 1.0


def test_all_ignored_and_empty():
    ignored = [{"labels": torch.full((2, 5), -100)}, {"labels": torch.tensor([[7, -100]])}]
    assert step_token_count(ignored, None) == 0.0
    assert step_token_count([], None) == 0.0


def _two_ranks():
    rank = dist.get_rank()
    batches = micro_batches(10 + rank)
    expected = naive(micro_batches(10)) + naive(micro_batches(11))
    assert step_token_count(batches, dist.group.WORLD) == expected
    masked = naive(micro_batches(10), True) + naive(micro_batches(11), True)
    assert step_token_count(batches, dist.group.WORLD, mask_sequence_starts=True) == masked
    # one rank with nothing to count still takes part in the collective
    nothing = [{"labels": torch.full((1, 4), -100)}] if rank == 1 else batches
    assert step_token_count(nothing, dist.group.WORLD) == naive(micro_batches(10))


def test_all_reduced_over_two_gloo_ranks():
    run_distributed_test(_two_ranks, 2, timeout=120)
