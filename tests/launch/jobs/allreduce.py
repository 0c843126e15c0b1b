"""A 2-rank gloo all-reduce: the launch path of slurm/common.sh (srun -> torchrun -> ranks) without
the trainer.  Each rank writes <out>/rank<r>.json with what it saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

out = sys.argv[1]
dist.init_process_group("gloo")  # env:// from torchrun (or SLURM vars mapped below)
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "world_size": world,
            "sum": t.item(),
            "master_addr": os.environ.get("MASTER_ADDR"),
            "master_port": os.environ.get("MASTER_PORT"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        },
        f,
    )
dist.destroy_process_group()
