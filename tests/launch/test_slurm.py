"""The Slurm launchers (slurm/*.sh) on a real one-node Slurm cluster on 127.0.0.1: real munged,
slurmctld, slurmd, `sbatch`, job steps, signals and requeue (tests/launch/slurm_cluster.py).  The
rendezvous through both launchers, preemption with requeue and the sweep run on two hosts in
test_multinode_slurm.py (a superset of their one-node forms, which are not repeated here)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from recall_dist.distributed.net import free_port
from tests.launch.runs import REPO, TINY, checkpoint_steps, read_metrics
from tests.launch.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def sbatch(cluster: SlurmCluster, tmp_path: Path, *args: str, ranks: int = 2, **env: str) -> str:
    """Submit from the repo root (as a user does) with ``ranks`` ranks on one node; returns the job id."""
    extra = {"MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo", **env}
    out = cluster.run(
        "sbatch",
        "--parsable",
        f"--ntasks-per-node={ranks}",
        "--cpus-per-task=1",
        "--time=00:10:00",
        f"--output={tmp_path}/%x-%j.out",
        *args,
        cwd=str(REPO),
        env=cluster.env(**extra),
    )
    return out.strip().split(";")[0]


def job_log(tmp_path: Path, job_id: str) -> str:
    logs = list(tmp_path.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def assert_completed(cluster: SlurmCluster, tmp_path: Path, job_id: str, timeout: float) -> dict:
    info = cluster.wait_job(job_id, timeout)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (
        f"job {job_id}: {info}\n--- job log\n{job_log(tmp_path, job_id)}\n{cluster.logs()}"
    )
    return info


@pytest.fixture(scope="module")
def slurm_trained_run(slurm_cluster, tmp_path_factory):
    """`sbatch slurm/train_cdiv.sh configs/tiny_cpu.yaml ...`: 2 ranks, 6 steps of c-Div."""
    tmp = tmp_path_factory.mktemp("sbatch_train")
    run = tmp / "run"
    job_id = sbatch(slurm_cluster, tmp, "slurm/train_cdiv.sh", *TINY, "train.max_steps=6", OUTPUT_DIR=str(run))
    info = assert_completed(slurm_cluster, tmp, job_id, timeout=240)
    return run, job_id, info, job_log(tmp, job_id)


def test_sbatch_train_cdiv(slurm_trained_run):
    """The job trains c-Div on 2 ranks to max_steps; the checkpoint, metrics and HF export are where
    the trainer promises."""
    run, job_id, info, log = slurm_trained_run
    print(f"job {job_id}: JobState={info['JobState']} ExitCode={info['ExitCode']} Restarts={info.get('Restarts')}")
    assert "2 rank(s)" in log and "loss.name=cdiv" in log, log
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7)), log
    assert all("divergence" in m for m in metrics), "c-Div reports its divergence value"
    assert checkpoint_steps(run) == [6], log
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE").exists()
    assert (run / "final" / "config.json").exists(), log
    assert not (run / "PREEMPTED").exists()


def test_grid_cdiv_job_array(slurm_cluster, tmp_path):
    """`sbatch slurm/grid_cdiv.sh`: one array task per alpha, each into its own output dir."""
    grid = tmp_path / "grid"
    array_id = sbatch(
        slurm_cluster,
        tmp_path,
        "--array=0-1",
        f"--output={tmp_path}/%x-%A_%a.out",
        "slurm/grid_cdiv.sh",
        *TINY,
        "train.max_steps=2",
        "train.export_final=false",
        ranks=1,
        ALPHAS="1.2 2.0",
        GRID_DIR=str(grid),
        MASTER_PORT="",
    )  # "": each task takes its own port (from its job id)
    for task, alpha in enumerate(("1.2", "2.0")):
        info = assert_completed(slurm_cluster, tmp_path, f"{array_id}_{task}", timeout=240)
        print(f"job {array_id}_{task} (JobId={info['JobId']}): JobState={info['JobState']} ExitCode={info['ExitCode']}")
        run = grid / f"alpha_{alpha}"
        assert [m["step"] for m in read_metrics(run)] == [1, 2]
        saved = yaml.safe_load((run / "checkpoints" / "step_00000002" / "config.yaml").read_text())
        assert saved["loss"]["name"] == "cdiv" and saved["loss"]["params"]["alpha"] == float(alpha), saved["loss"]


def test_failure_requeues_are_counted_and_limited(slurm_cluster, tmp_path):
    """A training job that runs again without having been preempted (Slurm's requeue after a node
    failure, or `scontrol requeue`) says so and counts it; past RECALL_DIST_MAX_REQUEUES it gives up,
    naming the checkpoint to resume from.  A restart after a preemption is not counted."""
    out = tmp_path / "run"
    job_id = sbatch(
        slurm_cluster, tmp_path, "tests/launch/jobs/restart_check.sh", str(out), ranks=1, RECALL_DIST_MAX_REQUEUES="1"
    )

    def requeue_when_ready(n: int) -> str:
        deadline = time.monotonic() + 120
        while job_log(tmp_path, job_id).count("ready (restart") < n:
            assert time.monotonic() < deadline, f"run {n} not ready\n{job_log(tmp_path, job_id)}"
            time.sleep(0.5)
        slurm_cluster.run("scontrol", "requeue", job_id)
        return job_log(tmp_path, job_id)

    requeue_when_ready(1)
    (out / "PREEMPTED").write_text("7\n")  # as the trainer leaves it when it stops for a preemption
    log = requeue_when_ready(2)
    assert "restart 1 after a preemption at step 7" in log, log
    (out / "PREEMPTED").unlink()
    log = requeue_when_ready(3)
    assert (
        "restart 2 after a failure" in log and "failure requeue 1 of at most 1; last complete checkpoint: none" in log
    ), log
    info = slurm_cluster.wait_job(job_id, 120)
    log = job_log(tmp_path, job_id)
    print(f"job {job_id}: JobState={info['JobState']} Restarts={info['Restarts']}")
    print("\n".join(line for line in log.splitlines() if "restart" in line or "ERROR" in line))
    assert info["JobState"] == "FAILED" and info["Restarts"] == "3", info
    assert "requeued after a failure 2 times" in log and "more than RECALL_DIST_MAX_REQUEUES=1: giving up" in log, log
    assert log.count("ready (restart") == 3
    assert (out / "FAILURE_REQUEUES").read_text().split("\n")[:2] == [f"{job_id} 2", f"{job_id} 3"]
