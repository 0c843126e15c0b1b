"""Where this process sits, and how rank 0's answer reaches the others: ranks from the launcher's
environment (torchrun / the ``deepspeed`` launcher, or ``srun``), the world group, and "decide on rank 0,
broadcast to every rank".  Process groups are passed explicitly; ``None`` means not distributed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from recall_dist.distributed.collectives import group_rank, group_size

T = TypeVar("T")


# ------------------------------------------------------------------------------ launcher environment


def launcher_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) set by the launcher: torchrun / the ``deepspeed`` launcher
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``,
    ``SLURM_LOCALID``); None for a plain process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def env_rank() -> int:
    """This process's global rank from the environment alone (``RANK``, else ``SLURM_PROCID``, else 0):
    usable before any process group exists, e.g. to print a message once."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def env_local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``, else ``SLURM_LOCALID``, else 0): its GPU."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): torch.distributed if initialised, else the launcher's
    environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    ranks = launcher_ranks()
    return (0, 1) if ranks is None else ranks[:2]


# ----------------------------------------------------------------------------------- rank 0 decides


def world_group():
    """The default group when there are several processes, else None (not distributed).  For the
    callers whose API has no group argument (checkpoints, manifests, the HF Trainer): the one place
    the global group is looked up."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def _src(group) -> int:
    return dist.get_global_rank(group, 0)  # broadcast_object_list takes a global rank


def broadcast_from_rank0(value: T, group) -> T:
    """Collective over ``group``: rank 0's ``value`` on every rank (the others' ``value`` is ignored);
    ``group`` None or of size 1: ``value``."""
    if group_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=_src(group), group=group)
    return box[0]


def _rank0_failed(error: Exception) -> Exception:
    return RuntimeError(f"on rank 0: {type(error).__name__}: {error}")


def on_rank0(fn: Callable[[], T], group, error_elsewhere: Callable[[Exception], Exception] = _rank0_failed) -> T:
    """Collective over ``group``: ``fn()`` on its rank 0 only; every rank returns the result.  If ``fn``
    raises, rank 0 raises its own error and every other rank raises ``error_elsewhere(error)`` (built
    on rank 0 and broadcast, so it must pickle; default: a ``RuntimeError`` naming rank 0's error):
    no rank is left waiting for a result that will not come.  ``group`` None: just ``fn()``."""
    if group_size(group) == 1:
        return fn()
    box: list = [None]
    error = None
    if group_rank(group) == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:
            error, box[0] = e, (False, error_elsewhere(e))
    dist.broadcast_object_list(box, src=_src(group), group=group)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        raise value
    return value
