"""``recall_dist/distributed/ranks.py``: ranks from each launcher's environment, and rank 0's decision
reaching every rank of a real gloo group (world size 2, and a sub-group of ranks 1 and 2 of 3 whose
rank 0 is global rank 1), its errors included."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from recall_dist.distributed.ranks import (
    broadcast_from_rank0,
    env_local_rank,
    env_rank,
    launcher_ranks,
    on_rank0,
    rank_and_world,
    world_group,
)
from recall_dist.distributed.testing import run_distributed_test

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def _set_env(monkeypatch, env: dict[str, str]) -> None:
    for key in _LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),  # torchrun / deepspeed launcher
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (5, 16, 1)),  # srun
        ({}, None),  # a plain process: the trainer makes a one-process group
    ],
)
def test_ranks_come_from_the_launchers_env(monkeypatch, env, expected):
    _set_env(monkeypatch, env)
    assert launcher_ranks() == expected


@pytest.mark.parametrize(
    "env,rank,local,rank_world",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "2"}, 3, 1, (3, 8)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"}, 5, 2, (5, 16)),
        ({"RANK": "4"}, 4, 0, (0, 1)),  # no world size: not a launcher's environment
        ({}, 0, 0, (0, 1)),
    ],
)
def test_rank_helpers_read_torchrun_first_then_slurm(monkeypatch, env, rank, local, rank_world):
    _set_env(monkeypatch, env)
    assert not dist.is_initialized()
    assert (env_rank(), env_local_rank(), rank_and_world()) == (rank, local, rank_world)


def test_without_a_group_nothing_is_distributed():
    assert world_group() is None
    assert broadcast_from_rank0("mine", None) == "mine"
    assert on_rank0(lambda: 7, None) == 7
    with pytest.raises(ValueError, match="bad"):
        on_rank0(lambda: (_ for _ in ()).throw(ValueError("bad")), None)


class _Refused(Exception):
    pass


def _refused_elsewhere(error: Exception) -> Exception:
    return KeyError(f"translated: {error}")


def _world_of_two() -> None:
    rank = dist.get_rank()
    group = world_group()
    assert group is dist.group.WORLD and rank_and_world() == (rank, 2)
    assert broadcast_from_rank0({"rank": rank, "list": [rank] * 3}, group) == {"rank": 0, "list": [0, 0, 0]}
    calls = []
    assert on_rank0(lambda: calls.append(rank) or f"decided by {rank}", group) == "decided by 0"
    assert calls == ([0] if rank == 0 else [])  # run once, on rank 0 only

    def fail():
        raise _Refused(f"no on rank {rank}")

    with pytest.raises(_Refused if rank == 0 else RuntimeError) as caught:
        on_rank0(fail, group)
    assert str(caught.value) == ("no on rank 0" if rank == 0 else "on rank 0: _Refused: no on rank 0")
    with pytest.raises(_Refused if rank == 0 else KeyError, match="no on rank 0"):
        on_rank0(fail, group, _refused_elsewhere)
    assert on_rank0(lambda: rank, group) == 0  # the group is still in step after the errors


def test_rank0_decides_for_a_world_of_two():
    run_distributed_test(_world_of_two, 2, timeout=120)


def _subgroup_of_three() -> None:
    rank = dist.get_rank()
    group = dist.new_group([1, 2])  # on every rank, in the same order
    if rank == 0:
        assert broadcast_from_rank0("alone", None) == "alone"
        return
    # The sub-group's rank 0 is global rank 1: its value and its decision reach global rank 2.
    assert broadcast_from_rank0(f"from {rank}", group) == "from 1"
    assert on_rank0(lambda: rank * 10, group) == 10


def test_rank0_of_a_subgroup_is_its_first_member():
    run_distributed_test(_subgroup_of_three, 3, timeout=120)
