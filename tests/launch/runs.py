"""What the launcher tests read back from a training run or a sweep, and the one-node reference runs
the multi-node tests compare with (plain torchrun, 2 processes on loopback, no cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recall_dist.distributed.net import free_port

REPO = Path(__file__).resolve().parents[2]
# A tiny run: 2 CPU ranks; epochs high enough that max_steps is what ends it.
TINY = ["configs/tiny_cpu.yaml", "train.epochs=100", "train.log_every=1", "train.progress_bar=false"]
# The multi-node runs: c-Div, long enough to be preempted, checkpointed and resumed mid-run.
MULTINODE_STEPS = 100
MULTINODE_RUN = [*TINY, "loss.name=cdiv", f"train.max_steps={MULTINODE_STEPS}"]
SWEEP = ["configs/sweep.yaml", "temperatures=[0.5,1.0]", "num_samples=20"]


def read_metrics(output_dir: Path) -> list[dict]:
    """The step records (each start's header skipped: recall_dist/train/metrics_log.py)."""
    path = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in records if "header" not in r]


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in (output_dir / "checkpoints").glob("step_*"))


def complete_checkpoints(output_dir: Path) -> list[int]:
    root = output_dir / "checkpoints"
    return [s for s in checkpoint_steps(output_dir) if (root / f"step_{s:08d}" / "COMPLETE").exists()]


# The wall-clock values of a step (recall_dist/train/metrics_log.py, throughput)
WALL_CLOCK = ("step_seconds", "trained_tokens_per_s", "input_tokens_per_s", "tokens_per_s")


def loss_curve(output_dir: Path) -> list[dict]:
    """Every logged step's numbers except the wall-clock ones (``WALL_CLOCK``): what must not depend on
    where the ranks ran or how often the run was stopped and resumed."""
    return [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in read_metrics(output_dir)]


def first_difference(curve: list[dict], reference: list[dict]) -> str:
    for a, b in zip(curve, reference, strict=False):
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            return f"step {b.get('step')}: " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
    return f"{len(curve)} steps vs {len(reference)}"


def torchrun_reference(args: list[str], log: Path, timeout: float = 600) -> None:
    """``torchrun --nproc-per-node 2 -m recall_dist ARGS`` on loopback (one node, two processes)."""
    # The venv's bin first, as in the Slurm jobs (they activate it) and on the Ray nodes: DeepSpeed
    # JIT-builds its CPU op with the first `ninja` on PATH, and two ninja versions (the venv's, the
    # system's) do not trust each other's build log: each would rebuild it, minutes on 2 cores.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu"}
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "recall_dist", *args,
    ]  # fmt: skip
    with open(log, "w") as f:
        r = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if r.returncode != 0:
        raise AssertionError(f"reference run failed ({r.returncode}): {' '.join(args)}\n{log.read_text()[-5000:]}")
