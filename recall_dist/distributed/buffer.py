"""``RollingQuantileBuffer``: a ring buffer of recent per-sample losses, identical on every
data-parallel rank, whose quantile is the truncation threshold tau of TruncR/TruncP.
"""

from __future__ import annotations

import torch

from recall_dist.distributed.collectives import all_gather_varlen


class RollingQuantileBuffer:
    """Ring buffer of the last ``capacity`` values pushed by all ranks of ``group``.

    ``push(values)`` all-gathers the 1-D ``values`` of every rank of ``group`` (in rank order,
    ranks may push different counts, including zero) and appends them, so after each push the
    buffer is identical on every rank.  ``push`` is a collective: every rank of ``group`` must call
    it the same number of times.  ``quantile(q)`` uses linear interpolation (numpy's default).

    Values are kept in float64 on the CPU: the buffer is small, and the quantile must not depend on
    the device or on accumulated rounding.
    """

    def __init__(self, capacity: int, group=None):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.group = group
        self._data = torch.zeros(capacity, dtype=torch.float64)
        self._next = 0  # slot the next value goes to
        self.total_pushed = 0  # values ever pushed (all ranks)

    def __len__(self) -> int:
        return min(self.total_pushed, self.capacity)

    def push(self, values: torch.Tensor) -> torch.Tensor:
        """Gather ``values`` from all ranks, append them, and return the gathered values."""
        values = values.detach().reshape(-1)
        gathered = all_gather_varlen(values, self.group).to("cpu", torch.float64)
        k = gathered.numel()
        if k >= self.capacity:  # only the newest `capacity` values survive
            self._data.copy_(gathered[-self.capacity :])
            self._next = 0
        elif k:
            end = self._next + k
            if end <= self.capacity:
                self._data[self._next : end] = gathered
            else:
                split = self.capacity - self._next
                self._data[self._next :] = gathered[:split]
                self._data[: k - split] = gathered[split:]
            self._next = end % self.capacity
        self.total_pushed += k
        return gathered

    def values(self) -> torch.Tensor:
        """The buffered values, oldest first (float64, CPU)."""
        if self.total_pushed < self.capacity:
            return self._data[: self.total_pushed].clone()
        return torch.cat([self._data[self._next :], self._data[: self._next]])

    def quantile(self, q: float) -> float:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        if len(self) == 0:
            raise ValueError("quantile of an empty RollingQuantileBuffer")
        return float(torch.quantile(self.values(), q))

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "values": self.values(), "total_pushed": self.total_pushed}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["capacity"]) != self.capacity:
            raise ValueError(f"buffer capacity mismatch: checkpoint has {sd['capacity']}, this buffer {self.capacity}")
        values = torch.as_tensor(sd["values"], dtype=torch.float64).reshape(-1)
        self._data.zero_()
        self._data[: values.numel()] = values
        self._next = values.numel() % self.capacity
        self.total_pushed = int(sd["total_pushed"])
