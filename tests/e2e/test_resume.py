"""Kill and resume under real launchers (torchrun, 2 processes): a run stopped by SIGTERM on one
worker, then resumed with ``resume: auto``, reproduces the uninterrupted run's per-step losses exactly
-- with truncr, so the truncation buffer must come back too (after a resume without it, w = 1 until
min_count and the losses would differ).  A hard kill (every process of a node) and its resume run in
tests/launch/test_multinode_slurm.py; exact resumes on every backend in tests/train/test_scale.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from recall_dist.train.metrics_log import read_metrics
from recall_dist.train.rundir import latest_checkpoint
from tests.train.helpers import tiny_config_dict

STEPS = 24
REPO = Path(__file__).resolve().parents[2]


def _write_config(tmp_path: Path, backend: dict) -> Path:
    data = tiny_config_dict(
        "unused",
        backend=backend,
        data={"num_samples": 1024},
        loss={"name": "truncr", "params": {"drop": 0.5, "granularity": "sequence", "buffer_size": 64, "min_count": 16}},
        train={"max_steps": STEPS, "checkpoint_every": 4, "keep_checkpoints": 2, "export_final": True},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(config: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "recall_dist",
        "train",
        str(config),
        f"train.output_dir={out}",
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended before the interruption: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run to progress"
        time.sleep(0.02)


def _worker_of_rank(proc: subprocess.Popen, rank: str) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "recall_dist" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def _check_exports(out: Path, tmp_path: Path) -> None:
    """``final/`` (written from the live engine) loads with transformers and equals ``export_hf`` of
    the last checkpoint (read offline, one process)."""
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.train.export import export_hf

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert len(load_tokenizer(str(out / "final"))) == final.config.vocab_size
    offline = AutoModelForCausalLM.from_pretrained(
        export_hf(latest_checkpoint(out / "checkpoints"), tmp_path / "exported")
    )
    for (name, a), (_, b) in zip(final.state_dict().items(), offline.state_dict().items(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _baseline(config: Path, tmp_path: Path) -> dict[int, float]:
    out = tmp_path / "baseline"
    _finish(_launch(config, out))
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert any(r["kept_fraction"] < 1.0 for r in read_metrics(out)), "truncation never dropped a sample"
    return losses


@pytest.mark.slow
def test_sigterm_on_one_worker_checkpoints_exits_zero_and_resume_reproduces(tmp_path):
    config = _write_config(tmp_path, {"name": "deepspeed", "zero_stage": 2})
    expected = _baseline(config, tmp_path)
    out = tmp_path / "run"
    proc = _launch(config, out)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(read_metrics(out)) >= 3, proc)
    _worker_of_rank(proc, "1").send_signal(signal.SIGTERM)  # only rank 1: the ranks must agree
    _finish(proc)
    stopped_at = int((out / "PREEMPTED").read_text())
    assert 3 <= stopped_at < STEPS
    assert latest_checkpoint(out / "checkpoints").name == f"step_{stopped_at:08d}"
    _finish(_launch(config, out))
    assert not (out / "PREEMPTED").exists()
    assert _losses(out) == expected
    _check_exports(out, tmp_path)
