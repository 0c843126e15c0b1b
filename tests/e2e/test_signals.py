"""Signals through the launchers, with real torchrun and 2 worker processes (DeepSpeed, gloo):

- SIGTERM to ``recall-dist torchrun``, or to every process of the job at once (what Slurm does on
  preemption; plain torchrun then exits 1 though the workers saved), ends with the documented exit
  code 0, ``PREEMPTED`` and a checkpoint that the next run resumes;
- the run's own exit code comes through (3 for a diverged run, where torchrun says 1);
- SIGKILL to torchrun, or to ``recall-dist torchrun``, leaves no worker behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from recall_dist.train.metrics_log import read_metrics
from recall_dist.train.rundir import Checkpointer, latest_checkpoint
from tests.train.helpers import tiny_config_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 30  # of 32 per epoch (512 samples, global batch 16)


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A failed test must not leave a training job running: kill every process it started."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            proc.wait(30)
    _STARTED.clear()


def _start(tmp_path: Path, out: Path, launcher: str = "recall-dist", **sections) -> subprocess.Popen:
    config = tmp_path / f"config-{time.monotonic_ns()}.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(out, **sections)))
    launch = ["-m", "recall_dist", "torchrun"] if launcher == "recall-dist" else ["-m", "torch.distributed.run"]
    cmd = [sys.executable, *launch, "--standalone", "--nproc-per-node", "2", "-m", "recall_dist", "train", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    env.pop("RECALL_DIST_STOP_FILE", None)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _STARTED.append(proc)
    return proc


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int = 3, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= steps):
        assert proc.poll() is None, f"ended before it was signalled:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.05)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RANK" in child.environ() and "train" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


@pytest.mark.parametrize("who", ["launcher", "every process"])
def test_sigterm_saves_and_exits_with_the_requeue_code(tmp_path, who):
    out = tmp_path / "run"
    proc = _start(tmp_path, out, train={"max_steps": STEPS})
    _wait_for_steps(proc, out)
    targets = [psutil.Process(proc.pid)]
    if who == "every process":  # Slurm on preemption: every process of the job step, torchrun included
        targets += psutil.Process(proc.pid).children(recursive=True)
    for process in targets:
        process.send_signal(signal.SIGTERM)
    code, output = _finish(proc)
    assert code == 0, output[-4000:]
    stopped_at = int((out / "PREEMPTED").read_text())
    assert 3 <= stopped_at < STEPS
    assert latest_checkpoint(out / "checkpoints").name == f"step_{stopped_at:08d}"
    assert Checkpointer(out, 0).select("auto").name == f"step_{stopped_at:08d}"  # complete and verified
    if who == "every process":  # (resuming after such a stop: tests/e2e/test_resume.py)
        assert "torchrun exited 1" in output, "plain torchrun's own code (the reason for the wrapper) changed"


def test_the_runs_exit_code_comes_through(tmp_path):
    out = tmp_path / "run"
    code, output = _finish(_start(tmp_path, out, optim={"lr": 1e30}, train={"max_steps": 12}))
    assert code == 3, output[-4000:]
    assert "training diverged" in output and "torchrun exited 1" in output


@pytest.mark.parametrize("launcher", ["torchrun", "recall-dist"])
def test_sigkill_to_the_launcher_leaves_no_orphan_workers(tmp_path, launcher):
    out = tmp_path / "run"
    # Long enough (thousands of steps) that an orphan would still be training when checked.
    proc = _start(tmp_path, out, launcher=launcher, data={"num_samples": 50_000}, train={"max_steps": 5000})
    _wait_for_steps(proc, out)
    workers = _workers(proc)
    assert len(workers) == 2, workers
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while not all(_gone(w) for w in workers):
            orphans = [w.pid for w in workers if not _gone(w)]
            assert time.monotonic() < deadline, f"orphaned workers still running: {orphans}"
            time.sleep(0.1)
    finally:
        for worker in workers:  # orphans are no longer the launcher's descendants: kill them here
            with contextlib.suppress(psutil.Error):
                worker.kill()
