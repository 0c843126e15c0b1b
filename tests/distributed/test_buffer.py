"""RollingQuantileBuffer: identical on all ranks, numpy quantiles of the rank-ordered history."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from recall_dist import RollingQuantileBuffer
from recall_dist.distributed.testing import run_distributed_test


def test_ring_semantics_and_state_round_trip():
    buf = RollingQuantileBuffer(5)
    history = []
    for chunk in ([1.0, 2.0], [3.0], [], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]):
        buf.push(torch.tensor(chunk))
        history += chunk
        assert buf.values().tolist() == history[-5:]
        for q in (0.0, 0.3, 0.5, 0.9, 1.0):
            assert buf.quantile(q) == pytest.approx(np.quantile(history[-5:], q))
    clone = RollingQuantileBuffer(5)
    clone.load_state_dict(buf.state_dict())
    clone.push(torch.tensor([13.0]))
    buf.push(torch.tensor([13.0]))
    assert clone.values().tolist() == buf.values().tolist() and clone.total_pushed == buf.total_pushed


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        RollingQuantileBuffer(0)
    with pytest.raises(ValueError, match="empty"):
        RollingQuantileBuffer(3).quantile(0.5)
    with pytest.raises(ValueError, match="capacity mismatch"):
        RollingQuantileBuffer(3).load_state_dict(RollingQuantileBuffer(4).state_dict())


def _gather_ranks(capacity):
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = RollingQuantileBuffer(capacity, group=dist.group.WORLD)
    history = []
    for step in range(4):
        # ranks push different (seeded) counts, rank 1 sometimes nothing
        per_rank = [
            torch.arange(((step + r) % 3) * (r != 1 or step % 2 == 0), dtype=torch.float64) * 10 + 100 * step + r
            for r in range(world)
        ]
        buf.push(per_rank[rank])
        for r in range(world):
            history += per_rank[r].tolist()
        expect = history[-capacity:]
        assert buf.values().tolist() == expect
        if expect:
            assert buf.quantile(0.37) == pytest.approx(np.quantile(expect, 0.37))
        everyone = [None] * world
        dist.all_gather_object(everyone, buf.state_dict()["values"].tolist())
        assert all(v == everyone[0] for v in everyone)


@pytest.mark.parametrize("world", [2, 3])
def test_identical_on_all_ranks_in_rank_order(world):
    run_distributed_test(_gather_ranks, world, 6)
