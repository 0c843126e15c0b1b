"""``recall_dist/distributed/process_group.py``: the trainer's process group, whoever launched it — an
existing group used as is, the launcher's ranks with its rendezvous, or a one-process group; never a
guessed localhost for several ranks.  Each case runs in a fresh process (the default group is global)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from recall_dist.distributed.process_group import init_distributed, shutdown
from recall_dist.distributed.testing import run_distributed_test

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
_PROBE = """
import json, os
import torch.distributed as dist
from recall_dist.distributed.process_group import init_distributed, shutdown
try:
    ctx = init_distributed()
except RuntimeError as e:
    print(json.dumps({"error": str(e), "initialized": dist.is_initialized()}))
else:
    seen = {"rank": ctx.rank, "world": ctx.world_size, "local": ctx.local_rank, "created": ctx.created_group,
            "dp_group_is_none": ctx.dp_group is None, "world_of_group": dist.get_world_size(),
            "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}}
    shutdown(ctx)
    seen["initialized_after_shutdown"] = dist.is_initialized()
    print(json.dumps(seen))
"""


def _probe(env: dict[str, str], code: str = _PROBE) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARS, "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_launcher_gives_a_one_process_group_that_shutdown_destroys():
    seen = _probe({})
    assert seen["rank"] == 0 and seen["world"] == 1 and seen["local"] == 0 and seen["world_of_group"] == 1
    assert seen["created"] and seen["dp_group_is_none"]  # one process: not distributed
    assert seen["env"]["RANK"] == "0" and seen["env"]["WORLD_SIZE"] == "1"  # DeepSpeed reads these
    assert seen["initialized_after_shutdown"] is False


def test_srun_ranks_of_one_task_need_no_rendezvous():
    seen = _probe({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (seen["rank"], seen["world"], seen["local"]) == (0, 1, 0)
    assert seen["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def test_several_ranks_without_a_rendezvous_are_refused():
    seen = _probe({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})
    assert "rank 1 of 4" in seen["error"] and "MASTER_ADDR and MASTER_PORT must be set" in seen["error"]
    assert seen["initialized"] is False  # nothing started


def _existing_group_is_used() -> None:
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size) == (dist.get_rank(), dist.get_world_size()) == (ctx.rank, 3)
    assert ctx.created_group is False and ctx.dp_group is dist.group.WORLD
    shutdown(ctx)  # not ours: left for its owner
    assert dist.is_initialized()


def test_an_existing_group_is_used_as_is_and_left_alone():
    run_distributed_test(_existing_group_is_used, world_size=3)


def test_an_unknown_backend_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match=r"backend='nccl'.*allowed: None \(nccl with CUDA, else gloo\) or 'gloo'"):
        init_distributed(backend="nccl")
    assert not dist.is_initialized()


def test_a_gloo_only_group_from_srun_ranks_leaves_the_gpu_alone():
    code = _PROBE.replace("init_distributed()", "init_distributed(backend='gloo')")
    code = code.replace('"created": ctx.created_group,', '"device": str(ctx.device), "backend": dist.get_backend(),')
    seen = _probe({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, code)
    assert (seen["rank"], seen["world"], seen["local"]) == (0, 1, 0)
    assert seen["device"] == "cpu" and seen["backend"] == "gloo"  # even on a machine with GPUs
