"""A 2-rank gloo all-reduce: the launch path of slurm/common.sh (srun -> torchrun -> ranks) without
the trainer.  Each rank writes <out>/rank<r>.json with what it saw: its host, the rendezvous, and
the TCP connections its gloo group holds (local and remote addresses)."""

import json
import os
import socket
import sys

import psutil
import torch
import torch.distributed as dist

out = sys.argv[1]
before = {c.laddr for c in psutil.Process().net_connections("tcp")}
dist.init_process_group("gloo")  # env:// from torchrun, or from slurm/rank.sh under srun
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
# Connections made by the group (the store's and gloo's pairs), v4-mapped addresses unwrapped.
peers = sorted(
    {
        (c.laddr.ip.removeprefix("::ffff:"), c.raddr.ip.removeprefix("::ffff:"))
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.status == psutil.CONN_ESTABLISHED and c.laddr not in before
    }
)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(
        {
            "rank": rank,
            "world_size": world,
            "sum": t.item(),
            "hostname": socket.gethostname(),
            "connections": peers,
            "master_addr": os.environ.get("MASTER_ADDR"),
            "master_port": os.environ.get("MASTER_PORT"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        },
        f,
    )
dist.barrier()  # both ranks have listed their connections before either closes them
dist.destroy_process_group()
