"""The Slurm launchers on two hosts: node1 (10.77.0.1) and node2 (10.77.0.2), each a network
namespace with its own hostname and slurmd, slurmctld on node1 (tests/launch/two_host.py).  The
rendezvous, the per-node ranks and the gloo traffic cross a real network link; the loss curve must
be the one a single node with two processes gives, through a torchrun restart, a preemption and the
loss of node2."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.launch.runs import (
    MULTINODE_RUN,
    MULTINODE_STEPS,
    REPO,
    SWEEP,
    complete_checkpoints,
    first_difference,
    loss_curve,
    read_metrics,
)
from tests.launch.slurm_cluster import SlurmCluster
from tests.launch.two_host import IFACE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# A rank line of slurm/rank.sh: "rank 1/2 (node 1, local 0) on node2 [rdnet0 10.77.0.2], master node1:40141"
RANK_LINE = re.compile(r"rank (\d+)/(\d+) \(node (\d+), local (\d+)\) on (\S+) \[(\S+) ([\d.]+)\], master (\S+):(\d+)")
NODE_LINE = re.compile(r"node (\d+)/(\d+) on (\S+): torchrun, .* c10d rendezvous (\S+):(\d+), max restarts (\d+)")


@pytest.fixture(scope="module")
def slurm2(two_hosts):
    """slurmctld + slurmd on node1, slurmd on node2 (2 CPUs each); a silent slurmd is DOWN after 10 s."""
    cluster = SlurmCluster(cpus=2, hosts=two_hosts.hosts, slurmd_timeout=10)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


def sbatch(cluster: SlurmCluster, tmp: Path, *args: str, nodes: int = 2, **env: str) -> str:
    """Submit from the repo root on node1 (the login node here), one rank per node; -> the job id."""
    out = cluster.run(
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        "--time=00:30:00",  # far from the USR1@300 before the time limit
        f"--output={tmp}/%x-%j.out",
        *args,
        cwd=str(REPO),
        env=cluster.env(GLOO_SOCKET_IFNAME=IFACE, **env),
    )
    return out.strip().split(";")[0]


def job_log(tmp: Path, job_id: str) -> str:
    logs = list(tmp.glob(f"*-{job_id}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no job log)"


def wait_for(what: str, predicate, timeout: float, cluster: SlurmCluster, job_id: str, tmp: Path, poll=0.2):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s\n{job_log(tmp, job_id)}"
        time.sleep(poll)
    return value


def assert_completed(cluster: SlurmCluster, tmp: Path, job_id: str, timeout: float) -> dict:
    info = cluster.wait_job(job_id, timeout)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (
        f"job {job_id}: {info}\n--- job log\n{job_log(tmp, job_id)}\n{cluster.logs()}"
    )
    return info


def assert_same_curve(run: Path, reference: Path) -> None:
    curve, ref = loss_curve(run), loss_curve(reference)
    assert [m["step"] for m in curve] == list(range(1, MULTINODE_STEPS + 1))
    assert curve == ref, f"differs from the one-node run at {first_difference(curve, ref)}"


def ranks_seen(log: str) -> list[tuple]:
    """(rank, host, interface, address, master host) of each rank start, in log order."""
    return [(int(m[1]), m[5], m[6], m[7], m[8]) for m in RANK_LINE.finditer(log)]


def test_ranks_on_two_hosts_talk_over_the_link(slurm2, tmp_path):
    """A 2-rank all-reduce through both launchers (srun -> torchrun -> rank, srun -> rank): one rank
    per host, the head from the allocation (node1), and the gloo pairs connect 10.77.0.1 with
    10.77.0.2 (the ranks' own TCP connections), never loopback."""
    jobs = {}
    for launcher in ("torchrun", "srun"):
        (tmp_path / launcher).mkdir()
        jobs[launcher] = sbatch(
            slurm2, tmp_path, "tests/launch/jobs/allreduce.sh", str(tmp_path / launcher), LAUNCHER=launcher
        )
    for launcher, job_id in jobs.items():
        assert_completed(slurm2, tmp_path, job_id, timeout=240)
        ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / launcher).glob("rank*.json"))]
        log = job_log(tmp_path, job_id)
        for r in ranks:
            print(f"{launcher}: rank {r['rank']} on {r['hostname']}, master {r['master_addr']}, tcp {r['connections']}")
        assert [(r["rank"], r["world_size"], r["sum"]) for r in ranks] == [(0, 2, 3.0), (1, 2, 3.0)], log
        assert sorted(r["hostname"] for r in ranks) == ["node1", "node2"], log
        addr = {"node1": "10.77.0.1", "node2": "10.77.0.2"}
        for r in ranks:
            other = addr["node2" if r["hostname"] == "node1" else "node1"]
            assert [addr[r["hostname"]], other] in r["connections"], r
            assert not any(ip.startswith("127.") for pair in r["connections"] for ip in pair), r
        # The rank-0 process hosts the process group's store: MASTER_ADDR names its host.
        assert {r["master_addr"] for r in ranks} == {ranks[0]["hostname"]}, ranks
        seen = ranks_seen(log)
        assert sorted((rank, host, iface, a) for rank, host, iface, a, _ in seen) == sorted(
            (r["rank"], r["hostname"], IFACE, addr[r["hostname"]]) for r in ranks
        ), log
        if launcher == "srun":  # ranks follow the allocation: task 0 on its first node
            assert ranks[0]["hostname"] == "node1" and ranks[0]["master_addr"] == "node1"
        else:  # one torchrun per node, both rendezvous at the first node of the allocation
            nodes = sorted(m.groups() for m in NODE_LINE.finditer(log))
            assert [(n[0], n[2], n[3]) for n in nodes] == [("0", "node1", "node1"), ("1", "node2", "node1")], log


def rank_pids(host) -> list[int]:
    """The training ranks (python -m recall_dist train: not their torchrun, not rank.sh) of ``host``."""
    pids = []
    for pid in host.pids():
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if Path(cmd[0]).name.startswith("python") and cmd[1:4] == ["-m", "recall_dist", "train"]:
            pids.append(pid)
    return pids


def test_two_node_training_survives_a_rank_restart_and_a_preemption(slurm2, two_hosts, reference_run, tmp_path):
    """`sbatch --nodes=2 --ntasks-per-node=1 slurm/train_cdiv.sh configs/tiny_cpu.yaml`: one rank per
    host through the c10d rendezvous on node1.  Mid-run the rank on node2 is killed (torchrun,
    train.max_restarts=1, restarts both ranks in place from the last checkpoint), then the job is
    preempted (USR1: checkpoint, requeue, resume).  The loss curve is the one-node 2-process run's."""
    run = tmp_path / "run"
    link_bytes = two_hosts.node2.iface_bytes()
    job_id = sbatch(
        slurm2,
        tmp_path,
        "slurm/train_cdiv.sh",
        *MULTINODE_RUN,
        "train.checkpoint_every=20",
        "train.max_restarts=1",
        "train.export_final=false",
        OUTPUT_DIR=str(run),
    )
    ckpt = wait_for("a checkpoint", lambda: complete_checkpoints(run), 300, slurm2, job_id, tmp_path)[0]
    victims = rank_pids(two_hosts.node2)
    assert len(victims) == 1, victims
    psutil.Process(victims[0]).send_signal(signal.SIGKILL)  # the rank dies; node2 and its torchrun live

    resumed = f"resumed from {run}/checkpoints/step_{ckpt:08d} at step {ckpt}"
    wait_for(
        "the ranks restarted by torchrun", lambda: resumed in job_log(tmp_path, job_id), 300, slurm2, job_id, tmp_path
    )
    wait_for(
        "progress after the restart", lambda: read_metrics(run)[-1]["step"] >= ckpt + 3, 120, slurm2, job_id, tmp_path
    )
    slurm2.run("scancel", "--signal=USR1", "--batch", job_id)
    info = assert_completed(slurm2, tmp_path, job_id, timeout=400)
    log = job_log(tmp_path, job_id)
    moved = two_hosts.node2.iface_bytes() - link_bytes

    preempted = int(re.search(r"workers checkpointed at step (\d+); requeueing", log).group(1))
    seen = ranks_seen(log)
    print(
        f"job {job_id}: JobState={info['JobState']} Restarts={info['Restarts']}; rank {victims[0]} killed after "
        f"checkpoint {ckpt}; preempted at step {preempted}; {moved} bytes over {IFACE} of node2"
    )
    for rank, host, iface, addr, master in seen:
        print(f"  rank {rank} on {host} ({iface} {addr}), master {master}")
    # Every start (first run, torchrun's restart, the requeued run): both c10d agents at node1,
    # ranks 0 and 1 on different hosts, each on its link address.
    nodes = [m.groups() for m in NODE_LINE.finditer(log)]
    assert len(nodes) == 4 and {(n[2], n[3], n[5]) for n in nodes} == {
        ("node1", "node1", "1"),
        ("node2", "node1", "1"),
    }, log
    assert len(seen) == 6, log
    for start in (seen[0:2], seen[2:4], seen[4:6]):
        assert sorted((r, h, a) for r, h, _, a, _ in start) in (
            [(0, "node1", "10.77.0.1"), (1, "node2", "10.77.0.2")],
            [(0, "node2", "10.77.0.2"), (1, "node1", "10.77.0.1")],
        ), log
    assert log.count(resumed) == 1 and f"restart 1 after a preemption at step {preempted}" in log, log
    assert f"resumed from {run}/checkpoints/step_{preempted:08d} at step {preempted}" in log, log
    assert ckpt + 3 <= preempted < MULTINODE_STEPS and info["Restarts"] == "1"
    # Gradients and parameters crossed the link every step: at least the fp32 model per step.
    model_bytes = (reference_run / "final" / "model.safetensors").stat().st_size
    assert moved > model_bytes * MULTINODE_STEPS, (moved, model_bytes)
    assert_same_curve(run, reference_run)


def test_node_lost_mid_run_is_requeued_and_resumes(slurm2, two_hosts, reference_run, tmp_path):
    """Every process of node2 (its slurmd, the job step, torchrun, the rank) is killed after the first
    checkpoint.  What the user gets: slurmctld declares node2 DOWN (SlurmdTimeout), ends the job as a
    NODE_FAIL naming node2 in the job log, and requeues it (--requeue); it waits for two nodes, and
    once node2 is back it resumes from the last complete checkpoint: nothing lost, same curve."""
    run = tmp_path / "run"
    job_id = sbatch(
        slurm2, tmp_path, "slurm/train_cdiv.sh", *MULTINODE_RUN, "train.checkpoint_every=20",
        "train.export_final=false", OUTPUT_DIR=str(run),
    )  # fmt: skip
    ckpt = wait_for("a checkpoint", lambda: complete_checkpoints(run), 300, slurm2, job_id, tmp_path)[0]
    killed_at = time.monotonic()
    killed = two_hosts.node2.kill_all()
    try:
        requeued = wait_for(
            "the job requeued after node2 was lost",
            lambda: (j := slurm2.job(job_id)).get("JobState") == "PENDING" and int(j.get("Restarts", 0)) >= 1 and j,
            120, slurm2, job_id, tmp_path, poll=1.0,
        )  # fmt: skip
        # slurmctld marks node2 DOWN after SlurmdTimeout (10 s) whichever way the job ended.
        node2_state = wait_for(
            "node2 marked down", lambda: (st := slurm2.node_states()["node2"]).startswith("down") and st,
            60, slurm2, job_id, tmp_path, poll=1.0,
        )  # fmt: skip
        waited = time.monotonic() - killed_at
        first_run = (run / "metrics.jsonl").read_text().splitlines()
        log = job_log(tmp_path, job_id)
        print(
            f"killed node2's processes {killed} after checkpoint {ckpt}; after {waited:.0f}s: job {job_id} "
            f"{requeued['JobState']} (Reason={requeued['Reason']}, Restarts={requeued['Restarts']}), "
            f"node2 {node2_state}"
        )
        print("\n".join(line for line in log.splitlines() if "node2" in line.lower() and "error" in line.lower()))
        # Two ways to the same requeue, a race between them: slurmctld declares node2 dead first (the
        # job ends as a NODE_FAIL naming node2), or rank 0's lost connection fails the step first (our
        # script requeues the failed job itself).  Either way it waits for two nodes and resumes.
        assert ("Node failure on node2" in log and "DUE TO NODE FAILURE" in log) or "DUE TO JOB REQUEUE" in log, log
        # node2 comes back as after a reboot, not at once: when rank 0 failed, srun's
        # --kill-on-bad-exit asked Slurm to signal the step on node2, which missed it; slurmctld
        # retries such a signal once, 60 s later, by job and step id, and a node back before that
        # would see it kill the requeued run's step (same ids).  Seen with Slurm 22.05.
        time.sleep(max(0.0, killed_at + 90 - time.monotonic()))
    finally:
        slurm2.start_slurmd(two_hosts.node2)  # node2 comes back (ReturnToService=2)
    info = assert_completed(slurm2, tmp_path, job_id, timeout=400)
    log = job_log(tmp_path, job_id)
    print(f"node2 back: job {job_id} JobState={info['JobState']} Restarts={info['Restarts']}")
    assert f"failure requeue 1 of at most 3; last complete checkpoint: {run}/checkpoints/step_{ckpt:08d}" in log, log
    assert f"resumed from {run}/checkpoints/step_{ckpt:08d} at step {ckpt}" in log, log
    # The first run's metrics are kept up to the checkpoint, byte for byte (tokens_per_s is wall
    # clock: a run from step 0 would not reproduce it); after it, the resumed run's.
    assert (run / "metrics.jsonl").read_text().splitlines()[:ckpt] == first_run[:ckpt]
    assert_same_curve(run, reference_run)


def test_sweep_on_two_nodes_equals_one_node(slurm2, reference_run, reference_sweep, tmp_path):
    """`sbatch --nodes=2 slurm/sweep.sh`: one rank per host, same table as one node with 2 processes."""
    out = tmp_path / "sweep"
    model = f"models=[{{name: cdiv, path: {reference_run}/final}}]"
    job_id = sbatch(slurm2, tmp_path, "slurm/sweep.sh", *SWEEP, model, OUTPUT_DIR=str(out))
    info = assert_completed(slurm2, tmp_path, job_id, timeout=300)
    log = job_log(tmp_path, job_id)
    print(f"job {job_id}: JobState={info['JobState']}; ranks {ranks_seen(log)}")
    assert sorted((r, h) for r, h, *_ in ranks_seen(log)) in (
        [(0, "node1"), (1, "node2")],
        [(0, "node2"), (1, "node1")],
    )
    csv = (out / "sweep.csv").read_text()
    print(csv)
    assert csv == (reference_sweep / "sweep.csv").read_text()
