"""``recall_dist/eval/cli.py``: the sweep's ranks come from the launcher through
``distributed/process_group.py``.  Two real processes that carry only srun's variables
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) and the rendezvous form one gloo group and
write the same tables as one process; the in-process CLI paths are in ``test_sweep.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recall_dist.data import CharTokenizer, build_task
from recall_dist.distributed.net import free_port
from recall_dist.eval.cli import main
from tests.eval.models import random_llama, save

REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
LAUNCHER_VARS += ("SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT")
# The real CLI, with run_sweep wrapped to record the group it runs in (then run unchanged).
OBSERVED_CLI = """
import json, sys
import torch.distributed as dist
from recall_dist.eval import cli, driver

real = driver.run_sweep

def observed(cfg, rank, world_size):
    group = dist.is_initialized()
    seen = {"rank": rank, "world": world_size, "group_size": dist.get_world_size() if group else None,
            "backend": dist.get_backend() if group else None}
    with open(sys.argv[1], "w") as f:
        json.dump(seen, f)
    return real(cfg, rank, world_size)

driver.run_sweep = observed
sys.exit(cli.main(sys.argv[2:]))
"""


def _sweep_yaml(tmp_path: Path) -> Path:
    task = build_task("product_conditional", max_factor=3)
    tok = CharTokenizer(task.alphabet)
    models = [
        {"name": n, "path": str(save(random_llama(tok.vocab_size, s), tok, tmp_path / n))}
        for n, s in (("a", 0), ("b", 1))
    ]
    cfg = {"models": models, "task": "product_conditional", "task_params": {"max_factor": 3}}
    cfg |= {"temperatures": [0.5, 1.0], "num_samples": 8, "generate_batch_size": 8}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # three sweeps, two of them fresh interpreters
def test_srun_ranks_form_one_group_and_match_one_process(tmp_path, monkeypatch):
    config = _sweep_yaml(tmp_path)
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main([str(config), f"output_dir={tmp_path / 'one'}"]) == 0

    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    srun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_NTASKS": "2", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                OBSERVED_CLI,
                str(tmp_path / f"seen{r}.json"),
                str(config),
                f"output_dir={tmp_path / 'two'}",
            ],
            env={**base, **srun, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    assert seen == [{"rank": r, "world": 2, "group_size": 2, "backend": "gloo"} for r in range(2)]
    assert sorted(os.listdir(tmp_path / "two" / "shards")) == [f"shard-{s:05d}-of-00002.json" for s in range(2)]
    for name in ("sweep.csv", "sweep.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert "max recall" in outputs[0] and "max recall" not in outputs[1]  # rank 0 prints the table
