"""Run a whole sweep from torchrun / srun / one process: every rank computes its shards
(rank, rank + world, ... of ``cfg.num_shards`` or ``world``), text sweeps then count their k-NN
part (one per rank), and rank 0 aggregates.  The tables do not depend on the number of ranks."""

from __future__ import annotations

import time

from recall_dist.distributed.ranks import rank_and_world
from recall_dist.eval.aggregate import aggregate, compute_text_part, read_text_part
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.shards import read_shard
from recall_dist.eval.sweep import compute_shard


def _wait_for(done, what: str, deadline: float) -> None:
    """A barrier if a process group exists, else poll ``done()`` (ranks of a job array, say)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still missing at the deadline")
        time.sleep(2.0)


def run_sweep(
    cfg: SweepConfig, rank: int | None = None, world_size: int | None = None, wait_timeout: float = 24 * 3600.0
) -> dict | None:
    """Compute this rank's shards, wait for the others, count this rank's text part (text sweeps),
    and on rank 0 aggregate.  Returns the aggregate (rank 0) or None."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    num_shards = cfg.num_shards or world_size
    deadline = time.monotonic() + wait_timeout
    for shard in range(rank, num_shards, world_size):
        compute_shard(cfg, shard, num_shards, progress=rank == 0)
    _wait_for(
        lambda: all(read_shard(cfg, s, num_shards) for s in range(num_shards)), f"shards of {cfg.output_dir}", deadline
    )
    if cfg.metric == "text":
        compute_text_part(cfg, rank, world_size, num_shards)
        _wait_for(
            lambda: all(read_text_part(cfg, p, world_size) for p in range(world_size)),
            f"text parts of {cfg.output_dir}",
            deadline,
        )
    if rank != 0:
        return None
    return aggregate(cfg, num_shards, num_parts=world_size if cfg.metric == "text" else 1)
