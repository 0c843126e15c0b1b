"""Distributed batch iterator: a deterministic global batch order shared by all data-parallel
ranks, each rank collating its own disjoint slice (optionally packed), resumable mid-epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from recall_dist.constants import IGNORE_INDEX


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} = {value!r}: must be an integer >= {minimum}")
    return value


class DistributedBatchIterator:
    """Micro-batches of ``dataset`` (``{"input_ids": list[int], "labels": list[int]}`` items) for
    data-parallel rank ``dp_rank`` of ``dp_size``.

    Order: epoch ``e`` visits the examples in a permutation drawn from ``(seed, e)`` (identity when
    ``shuffle=False``), identical on every rank.  Step ``s`` of the epoch takes the global batch
    ``order[s*G:(s+1)*G]`` with ``G = micro_batch_size * dp_size``, and rank ``r`` takes its slice
    ``[r*mbs:(r+1)*mbs]`` -- so the union over ranks of one step is exactly the global batch that
    a single process (``dp_size=1``, ``micro_batch_size=G``) gets at the same step.
    drop_last by optimizer step: with ``accumulation_steps`` micro-batches per optimizer step, an
    optimizer step takes ``S = G * accumulation_steps`` examples, an epoch has ``len(dataset) // S``
    optimizer steps, and the last ``len(dataset) % S`` examples of each epoch's order are skipped in that
    epoch (with shuffling, different ones every epoch).  So for the same S, every split of the step
    (micro-batch size x ranks x accumulation) sees the same examples in the same global order.

    Each batch is a dict of int64 tensors ``[B, T]``:
    ``input_ids`` (``pad_token_id`` on padding), ``labels`` (aligned with input_ids, the trainer
    shifts; -100 on padding and on the first token of every example), ``attention_mask`` (1 on
    tokens), ``sequence_ids`` (index of the example within this rank's micro-batch, -1 on padding)
    and ``position_ids`` (0, 1, ... restarting at every example, 0 on padding).
    Without packing, B = micro_batch_size and row i holds example i, padded to the longest one.
    With packing, the micro-batch's examples are placed in order, first-fit, into rows of at most
    ``max_length`` tokens, so B <= micro_batch_size; a packed model must keep examples apart
    (block-diagonal attention from ``sequence_ids``, or ``position_ids`` for varlen attention).
    ``T`` is the longest row of the micro-batch (never more than ``max_length`` when given).

    Iterating yields the remaining batches of the current epoch, then moves to the next epoch;
    ``state_dict()`` taken after ``k`` batches resumes with batch ``k + 1``.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = False,
        max_length: int | None = None,
        pad_token_id: int = 0,
        accumulation_steps: int = 1,
    ):
        self.accumulation_steps = _check_int(accumulation_steps, "accumulation_steps", 1)
        self.micro_batch_size = _check_int(micro_batch_size, "micro_batch_size", 1)
        self.dp_size = _check_int(dp_size, "dp_size", 1)
        self.dp_rank = _check_int(dp_rank, "dp_rank", 0)
        if dp_rank >= dp_size:
            raise ValueError(f"dp_rank = {dp_rank}: must be < dp_size = {dp_size}")
        self.seed = _check_int(seed, "seed", 0)
        if max_length is not None:
            _check_int(max_length, "max_length", 1)
        if packing and max_length is None:
            raise ValueError("packing = True needs max_length (the length of a packed row)")
        if len(dataset) < self.step_batch_size:
            raise ValueError(
                f"dataset has {len(dataset)} examples, fewer than one optimizer step's batch (micro_batch_size "
                f"{micro_batch_size} x dp_size {dp_size} x accumulation_steps {accumulation_steps}): no step is "
                "possible"
            )
        self.dataset, self.shuffle, self.packing = dataset, shuffle, packing
        self.max_length, self.pad_token_id = max_length, pad_token_id
        self.epoch, self.step = 0, 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def step_batch_size(self) -> int:
        """Examples per optimizer step, over all ranks and micro-batches."""
        return self.global_batch_size * self.accumulation_steps

    def __len__(self) -> int:
        """Micro-batches per epoch (drop_last by optimizer step)."""
        return len(self.dataset) // self.step_batch_size * self.accumulation_steps

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits the dataset (same on every rank)."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)).tolist()

    def global_batch_indices(self, epoch: int, step: int) -> list[int]:
        """Dataset indices of the global batch of ``(epoch, step)``, rank 0's slice first."""
        g = self.global_batch_size
        return self.epoch_order(epoch)[step * g : (step + 1) * g]

    def local_indices(self, epoch: int, step: int) -> list[int]:
        """Dataset indices of this rank's micro-batch at ``(epoch, step)``."""
        start = self.dp_rank * self.micro_batch_size
        return self.global_batch_indices(epoch, step)[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.step >= len(self):  # resumed exactly at an epoch's end
            self.epoch, self.step = self.epoch + 1, 0
        epoch = self.epoch
        order = self.epoch_order(epoch)
        start = self.dp_rank * self.micro_batch_size
        while self.epoch == epoch and self.step < len(self):
            base = self.step * self.global_batch_size + start
            batch = self.collate([self.dataset[i] for i in order[base : base + self.micro_batch_size]])
            # Count the batch as consumed before handing it out: a checkpoint taken while the
            # trainer holds batch k resumes with batch k + 1.
            self.step += 1
            yield batch
        if self.epoch == epoch:
            self.epoch, self.step = epoch + 1, 0

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Pad (or pack) ``examples`` into the ``[B, T]`` tensors described in the class docstring."""
        return collate(examples, self.pad_token_id, self.packing, self.max_length)

    def state_dict(self) -> dict:
        """Position (epoch, examples consumed in it) plus what fixes the batch order."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "consumed": self.step * self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "step_batch_size": self.step_batch_size,
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position.  The order must be the same (seed, shuffle, dataset size,
        examples per optimizer step); how a step is split (micro-batch size, ranks, accumulation) may
        change, as long as the position falls on a micro-batch boundary of the new split (it always does
        at an optimizer-step boundary, where checkpoints are taken)."""
        mine = self.state_dict()
        # States written before step_batch_size existed had one micro-batch per step.
        state = {"step_batch_size": state.get("global_batch_size"), **state}
        for key in ("seed", "shuffle", "step_batch_size", "dataset_size"):
            if key not in state:
                raise ValueError(f"data loader state has no {key!r}; keys: {sorted(state)}")
            if state[key] != mine[key]:
                raise ValueError(
                    f"data loader state {key} = {state[key]!r} differs from this iterator's "
                    f"{mine[key]!r}: the batch order would not continue"
                )
        consumed = int(state.get("consumed", state["step"] * state["global_batch_size"]))
        if consumed % self.global_batch_size:
            raise ValueError(
                f"data loader state: {consumed} examples consumed in the epoch is not a multiple of this "
                f"iterator's {self.global_batch_size} examples per micro-batch (resume at an optimizer-step boundary)"
            )
        step = consumed // self.global_batch_size
        if not 0 <= step <= len(self) or state["epoch"] < 0:
            raise ValueError(
                f"data loader state (epoch {state['epoch']}, {consumed} examples consumed) is out of range for "
                f"{len(self)} micro-batches of {self.global_batch_size} per epoch"
            )
        self.epoch, self.step = int(state["epoch"]), step


def _rows(lengths: list[int], packing: bool, max_length: int | None) -> list[list[int]]:
    """Example indices of each row: one per row, or first-fit packing into max_length."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows, free = [], []
    for i, n in enumerate(lengths):
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_length - n)
    return rows


def collate(
    examples: list[dict], pad_token_id: int = 0, packing: bool = False, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad (or pack) ``examples`` into the ``[B, T]`` tensors of ``DistributedBatchIterator``'s docstring."""
    lengths = [len(e["input_ids"]) for e in examples]
    for i, (e, n) in enumerate(zip(examples, lengths, strict=False)):
        if len(e["labels"]) != n or n == 0:
            raise ValueError(
                f"example {i} of the micro-batch: input_ids ({n}) and labels "
                f"({len(e['labels'])}) must have the same, non-zero length"
            )
        if max_length is not None and n > max_length:
            raise ValueError(
                f"example {i} of the micro-batch has {n} tokens > max_length "
                f"{max_length} (truncate it when building the dataset)"
            )
    rows = _rows(lengths, packing, max_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            n = lengths[i]
            input_ids[r, t : t + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, t : t + n] = torch.tensor(examples[i]["labels"])
            # Nothing precedes an example's first token inside the example: after the shift it
            # would be predicted from the previous packed example, so it is never a target.
            labels[r, t] = IGNORE_INDEX
            sequence_ids[r, t : t + n] = i
            position_ids[r, t : t + n] = torch.arange(n)
            t += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (sequence_ids >= 0).long(),
        "sequence_ids": sequence_ids,
        "position_ids": position_ids,
    }


def eval_batches(
    dataset: Sequence[dict], micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, pad_token_id: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded micro-batches of the validation set for rank ``dp_rank``: the examples ``dp_rank``,
    ``dp_rank + dp_size``, ... in order, so the ranks together see every example exactly once (no
    shuffling, nothing dropped).  Every rank yields the same number of batches,
    ``ceil(ceil(len(dataset) / dp_size) / micro_batch_size)`` (the loss is a collective): a rank whose
    examples have run out yields a filler batch of one row of two pad tokens, with no target."""
    _check_int(micro_batch_size, "micro_batch_size", 1)
    mine = list(range(dp_rank, len(dataset), dp_size))
    per_rank = math.ceil(len(dataset) / dp_size)
    calls = math.ceil(per_rank / micro_batch_size)
    for call in range(calls):
        indices = mine[call * micro_batch_size : (call + 1) * micro_batch_size]
        if indices:
            yield collate([dataset[i] for i in indices], pad_token_id)
        else:
            yield collate([{"input_ids": [pad_token_id] * 2, "labels": [IGNORE_INDEX] * 2}], pad_token_id)
