"""Process-group set-up for the trainer and the sweep, whoever launched them: the one place a
process group is started.

- A group that already exists is used as is (Ray Train workers, tests).
- Otherwise ranks come from the launcher's env vars: torchrun / the ``deepspeed`` launcher
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``), with ``MASTER_ADDR``/``MASTER_PORT`` as the rendezvous.
- With none of those, a one-process group on a free local port (so DeepSpeed and FSDP2 run unchanged).
- The backend is nccl with CUDA, else gloo; a caller whose group only carries barriers and small
  objects (the sweep) asks for gloo, which leaves the CUDA device alone.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from recall_dist.distributed.net import free_port
from recall_dist.distributed.ranks import env_local_rank, launcher_ranks


@dataclass
class DistContext:
    """Where this process sits: ``dp_group`` is None for a single process (not distributed).
    ``device``: this rank's GPU under an nccl group, else the CPU."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # True when we initialised the group (and so must destroy it)

    @property
    def dp_group(self):
        return dist.group.WORLD if self.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_minutes: float | None = None, backend: str | None = None) -> DistContext:
    """Join (or create) the default process group and return this process's ``DistContext``.
    ``timeout_minutes`` bounds every collective (default: torch's); saving a 13B checkpoint can keep
    the other ranks waiting in a barrier for minutes, so large runs raise it (``train.dist_timeout_minutes``).
    ``backend``: None picks nccl with CUDA, else gloo (the trainer); ``"gloo"`` makes a CPU group and
    does not bind a GPU (``device`` is the CPU), for callers that place their models themselves."""
    if backend not in (None, "gloo"):
        raise ValueError(f"backend={backend!r}: allowed: None (nccl with CUDA, else gloo) or 'gloo'")
    place = _device if backend is None else (lambda local: torch.device("cpu"))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = env_local_rank()
        return DistContext(rank, world, local, place(local), created_group=False)
    ranks = launcher_ranks()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if ranks is None:
        rank, world, local = 0, 1, 0
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        rank, world, local = ranks
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError(
                    f"rank {rank} of {world}: MASTER_ADDR and MASTER_PORT must be set "
                    "(the launcher's rendezvous); refusing to guess localhost"
                )
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        init_method = f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    device = place(local)
    # DeepSpeed reads these even when the group exists; srun does not set them.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    timeout = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    dist.init_process_group(backend, rank=rank, world_size=world, init_method=init_method, **timeout)
    return DistContext(rank, world, local, device, created_group=True)


def shutdown(ctx: DistContext) -> None:
    if ctx.created_group and dist.is_initialized():
        dist.destroy_process_group()
