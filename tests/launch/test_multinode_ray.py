"""The Ray launchers on a two-node Ray cluster: the head on node1 (10.77.0.1), a worker node on node2
(10.77.0.2), each a network namespace with its own hostname (tests/launch/two_host.py); the run
directories are shared storage (one filesystem).  Jobs go through the real `ray job submit`."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.launch.ray_cluster import RayCluster
from tests.launch.runs import MULTINODE_RUN, MULTINODE_STEPS, REPO, SWEEP, TINY, first_difference, loss_curve
from tests.launch.two_host import IFACE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Ray Train's list of a worker group: "- (ip=10.77.0.2, pid=8877) world_rank=1, local_rank=0, node_rank=1"
WORKER_LINE = re.compile(r"- \(ip=([\d.]+), pid=(\d+)\) world_rank=(\d+)")


@pytest.fixture(scope="module")
def ray2(two_hosts):
    """Ray head on node1 and a Ray worker node on node2, 2 CPUs each."""
    cluster = RayCluster(two_hosts.hosts, num_cpus=2, env={"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": IFACE})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


def submit(cluster: RayCluster, script: str, *args: str) -> str:
    out = cluster.ray(
        "job", "submit", "--address", cluster.address, "--no-wait", "--working-dir", ".", "--",
        "python", script, *args, cwd=str(REPO),
    )  # fmt: skip
    match = re.search(r"raysubmit_\w+", out)
    assert match, out
    return match.group(0)


def assert_succeeded(cluster: RayCluster, job_id: str, timeout: float) -> str:
    status = cluster.wait_job(job_id, timeout)
    assert status == "SUCCEEDED", f"{cluster.last_status_line}\n{cluster.job_logs(job_id)}\n{cluster.logs()}"
    return cluster.job_logs(job_id)


def worker_groups(logs: str) -> list[list[tuple[str, int]]]:
    """Each started worker group as [(node ip, world rank), ...], in start order."""
    groups = []
    for block in logs.split("Started training worker group of size")[1:]:
        groups.append(sorted((ip, int(rank)) for ip, _, rank in WORKER_LINE.findall(block.split("\n\n")[0])[:2]))
    return groups


def ray_registered_step(run) -> int | None:
    """The step of the latest checkpoint Ray Train registered (all ranks reported it), or None."""
    snapshot = run / "ray" / run.name / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def test_ray_train_spreads_over_two_nodes_and_survives_losing_one(ray2, two_hosts, reference_run, tmp_path):
    """`ray job submit -- python launch/ray_train.py ... ray.num_workers=2 ray.placement_strategy=SPREAD`:
    one worker per node.  Every process of node2 (raylet, worker, agents) is killed once Ray Train has
    registered a checkpoint: FailureConfig (ray.max_failures=1) restarts the group on the node left
    (SPREAD is soft), Ray hands the workers our checkpoint back, they resume from it (or from a later
    one saved before the kill but not yet registered), and the loss curve is the one-node 2-process
    run's."""
    run = tmp_path / "run"
    job_id = submit(
        ray2, "launch/ray_train.py", *MULTINODE_RUN, "train.checkpoint_every=20", "train.export_final=false",
        f"train.output_dir={run}", "ray.num_workers=2", "ray.placement_strategy=SPREAD", "ray.max_failures=1",
    )  # fmt: skip
    deadline, next_status = time.monotonic() + 300, 0.0
    while (registered := ray_registered_step(run)) is None:
        if time.monotonic() > next_status:  # `ray job status` takes a second or two: not every poll
            assert ray2.job_status(job_id) in ("PENDING", "RUNNING"), ray2.job_logs(job_id)
            next_status = time.monotonic() + 5
        assert time.monotonic() < deadline, f"no checkpoint registered with Ray\n{ray2.job_logs(job_id)}"
        time.sleep(0.1)
    try:
        killed = two_hosts.node2.kill_all()
        logs = assert_succeeded(ray2, job_id, timeout=400)
    finally:
        ray2.restart_worker(two_hosts.node2)  # node2 comes back for the next test
    groups = worker_groups(logs)
    restored = re.search(r"Ray Train restored checkpoint (\S+/step_(\d+)); resuming from the newest", logs)
    resumed = re.search(rf"resumed from {run}/checkpoints/step_(\d+) at step (\d+)", logs)
    print(f"{ray2.last_status_line}; Ray had registered step {registered} when node2's processes {killed} were killed")
    print(
        f"worker groups (node ip, world rank): {groups}; Ray restored {restored and restored.group(1)}; "
        f"the trainer {resumed and resumed.group(0)}"
    )
    assert sorted(ip for ip, _ in groups[0]) == ["10.77.0.1", "10.77.0.2"], logs  # SPREAD: one per node
    assert groups[1:] == [[("10.77.0.1", 0), ("10.77.0.1", 1)]], logs  # restarted on the node left
    assert restored and resumed, logs
    if {rank: ip for ip, rank in groups[0]}[0] == "10.77.0.2":  # the output_dir's LOCK went with node2
        assert f"removed {run}/LOCK: its holder ran on node2, which Ray declared dead" in logs, logs
    # Ray's checkpoint: the one registered at the kill or a later one; the trainer's: that or later.
    assert registered <= int(restored.group(2)) <= int(resumed.group(1)) == int(resumed.group(2)), logs
    curve, ref = loss_curve(run), loss_curve(reference_run)
    assert [m["step"] for m in curve] == list(range(1, MULTINODE_STEPS + 1))
    assert curve == ref, f"differs from the one-node run at {first_difference(curve, ref)}"


def test_ray_sweep_on_both_nodes(ray2, reference_run, reference_sweep, tmp_path):
    """`launch/ray_sweep.py` with 2 shard tasks that each need a whole node (2 CPUs): one runs on each
    node, and the table is the one-node 2-process sweep's."""
    out = tmp_path / "sweep"
    model = f"models=[{{name: cdiv, path: {reference_run}/final}}]"
    job_id = submit(
        ray2, "launch/ray_sweep.py", *SWEEP, model, f"output_dir={out}", "ray.num_shards=2", "ray.cpus_per_task=2"
    )
    logs = assert_succeeded(ray2, job_id, timeout=300)
    tasks = json.loads(
        ray2.ray(
            "list",
            "tasks",
            "--address",
            ray2.address,
            "--filter",
            "name=_compute_shard",
            "--detail",
            "--format",
            "json",
        )
    )
    nodes = {n["node_id"]: n["node_ip"] for n in ray2.alive_nodes()}
    ran_on = sorted(nodes.get(t.get("node_id"), t.get("node_id")) for t in tasks if t.get("state") == "FINISHED")
    print(f"{ray2.last_status_line}; shard tasks ran on {ran_on}")
    assert ran_on == ["10.77.0.1", "10.77.0.2"], (tasks, logs)
    csv = (out / "sweep.csv").read_text()
    assert csv == (reference_sweep / "sweep.csv").read_text(), csv


def test_ray_diverged_run_is_not_retried(ray2, tmp_path):
    """A run that diverges (lr 1e30: every step non-finite) under Ray Train stops once, with exit code
    3 and the trainer's message: Ray does not restart the worker group (it would diverge again)."""
    run = tmp_path / "run"
    job_id = submit(
        ray2, "launch/ray_train.py", *TINY, "optim.lr=1e30", "train.max_steps=12", f"train.output_dir={run}",
        "ray.num_workers=2", "ray.max_failures=2",
    )  # fmt: skip
    status = ray2.wait_job(job_id, timeout=300)
    logs = ray2.job_logs(job_id)
    status_text = ray2.ray("job", "status", "--address", ray2.address, job_id, timeout=60)
    print(ray2.last_status_line)
    assert status == "FAILED" and "failed with exit code 3" in status_text, f"{status_text}\n{logs}"
    assert "ray_train: training diverged" in logs, logs
    assert logs.count("Started training worker group of size 2") == 1, logs
    assert (run / "DIVERGED").is_file() and not (run / "final").exists()
