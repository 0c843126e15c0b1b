"""The Ray launchers (launch/*.py) on a real Ray head on 127.0.0.1, submitted with the real
`ray job submit` and followed with `ray job status` (tests/launch/ray_cluster.py)."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.launch.runs import REPO, TINY, checkpoint_steps, read_metrics

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def submit(head, *args: str) -> str:
    out = head.ray(
        "job",
        "submit",
        "--address",
        head.address,
        "--no-wait",
        "--working-dir",
        ".",
        "--",
        "python",
        "launch/ray_train.py",
        *args,
        cwd=str(REPO),
    )
    match = re.search(r"raysubmit_\w+", out)
    assert match, out
    return match.group(0)


def assert_succeeded(head, job_id: str, timeout: float) -> str:
    status = head.wait_job(job_id, timeout)
    assert status == "SUCCEEDED", f"{head.last_status_line}\n{head.job_logs(job_id)}"
    return head.job_logs(job_id)


@pytest.fixture(scope="module")
def ray_trained_run(ray_head, tmp_path_factory):
    """`ray job submit -- python launch/ray_train.py configs/tiny_cpu.yaml` (c-Div, 6 steps, 2 workers)."""
    run = tmp_path_factory.mktemp("ray_train") / "run"
    job_id = submit(
        ray_head, *TINY, "loss.name=cdiv", "train.max_steps=6", f"train.output_dir={run}", "ray.num_workers=2"
    )
    logs = assert_succeeded(ray_head, job_id, timeout=300)
    return run, logs, ray_head.last_status_line


def test_ray_job_submit_trains(ray_trained_run):
    """Ray Train runs 2 workers of our trainer on 127.0.0.1; the job SUCCEEDS and leaves the
    checkpoint, metrics and HF export."""
    run, logs, status_line = ray_trained_run
    print(status_line)
    assert "world_rank=1" in logs and "ip=127.0.0.1" in logs, logs
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 7)), logs
    assert checkpoint_steps(run) == [6]
    assert (run / "final" / "config.json").exists(), logs
    assert (run / "ray").is_dir(), "Ray Train's run state under <output_dir>/ray"


def test_ray_sweep(ray_head, ray_trained_run, tmp_path):
    """`launch/ray_sweep.py`: one Ray task per shard, then the aggregate table and plot."""
    run, _, _ = ray_trained_run
    out = tmp_path / "sweep"
    out_text = ray_head.ray(
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--no-wait",
        "--working-dir",
        ".",
        "--",
        "python",
        "launch/ray_sweep.py",
        "configs/sweep.yaml",
        f"models=[{{name: cdiv, path: {run}/final}}]",
        "temperatures=[0.5,1.0]",
        "num_samples=20",
        f"output_dir={out}",
        "ray.num_shards=2",
        cwd=str(REPO),
    )
    job_id = re.search(r"raysubmit_\w+", out_text).group(0)
    logs = assert_succeeded(ray_head, job_id, timeout=300)
    print(ray_head.last_status_line)
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == [
        "shard-00000-of-00002.json",
        "shard-00001-of-00002.json",
    ], logs
    table = json.loads((out / "sweep.json").read_text())
    assert sorted({(r["model"], r["temperature"]) for r in table["rows"]}) == [("cdiv", 0.5), ("cdiv", 1.0)]
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in table["rows"])
    assert (out / "pr_curve.png").stat().st_size > 0 and (out / "sweep.csv").exists()


def test_ray_worker_failure_restarts_group_from_our_checkpoint(ray_head, tmp_path):
    """A training worker is killed mid-run: Ray Train (FailureConfig max_failures=1) restarts the
    worker group and `resume: auto` continues from our latest checkpoint, not from step 0."""
    run, max_steps = tmp_path / "run", 120
    job_id = submit(
        ray_head,
        *TINY,
        "loss.name=cdiv",
        f"train.max_steps={max_steps}",
        "train.checkpoint_every=10",
        "train.export_final=false",
        f"train.output_dir={run}",
        "ray.max_failures=1",
    )

    def complete_checkpoints() -> list[int]:
        return [s for s in checkpoint_steps(run) if (run / "checkpoints" / f"step_{s:08d}" / "COMPLETE").exists()]

    deadline, next_status = time.monotonic() + 240, 0.0
    while not complete_checkpoints():  # kill as soon as there is one: the run must not end first
        if time.monotonic() > next_status:  # `ray job status` takes a second or two: not every poll
            assert ray_head.job_status(job_id) in ("PENDING", "RUNNING"), ray_head.job_logs(job_id)
            next_status = time.monotonic() + 5
        assert time.monotonic() < deadline, f"no checkpoint yet\n{ray_head.job_logs(job_id)}"
        time.sleep(0.1)
    workers = [p for p in ray_head.our_processes() if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    saved = complete_checkpoints()
    snapshot = (run / "metrics.jsonl").read_text().splitlines()
    workers[1].send_signal(signal.SIGKILL)  # a worker (or its node) dies

    logs = assert_succeeded(ray_head, job_id, timeout=400)
    print(f"{ray_head.last_status_line}; killed worker pid {workers[1].pid}, checkpoints then {saved}")
    assert logs.count("Started training worker group of size 2") == 2, logs
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, max_steps + 1))
    # The restarted group kept the first group's metrics up to the checkpoint it resumed from, byte
    # for byte (tokens_per_s is wall-clock: a restart from step 0 would not reproduce step 1).
    kept = next(i for i, (a, b) in enumerate(zip([*lines, None], [*snapshot, None], strict=False)) if a != b)
    assert kept in saved, f"resumed after step {kept}; checkpoints at the kill: {saved}"
