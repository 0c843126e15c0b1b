"""Fixtures of the launcher tests: real local clusters (a one-node Slurm cluster on 127.0.0.1, one
per session; two hosts on their own network stacks, one pair per multi-node module, which carry the
two-node Slurm cluster and the two-node Ray cluster) and the one-node reference runs the multi-node
runs are compared with."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch.runs import MULTINODE_RUN, SWEEP, torchrun_reference
from tests.launch.slurm_cluster import SlurmCluster, SlurmError
from tests.launch.two_host import HostError, TwoHosts, namespaces_unavailable


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster on 127.0.0.1; fails (never skips) when Slurm is missing."""
    try:
        cluster = SlurmCluster()
    except SlurmError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()


@pytest.fixture(scope="module")
def two_hosts():
    """node1 (10.77.0.1) and node2 (10.77.0.2): network namespaces joined by a veth pair, with their
    own hostnames (tests/launch/two_host.py).  Skipped only where network namespaces cannot be
    made (not root, or a sandbox that forbids them); every other problem fails."""
    reason = namespaces_unavailable()
    if reason is None:
        probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            reason = f"cannot create network namespaces here (`unshare --net --uts true`: {probe.stderr.strip()})"
    if reason:
        pytest.skip(reason)
    hosts = TwoHosts()
    try:
        hosts.create()
    except HostError as e:
        hosts.destroy()
        pytest.fail(f"could not build the two-host network: {e}", pytrace=False)
    try:
        yield hosts
    finally:
        hosts.destroy()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The multi-node runs' config trained by one node with 2 processes (torchrun on loopback),
    uninterrupted; its final export is the model the sweeps evaluate."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torchrun_reference(["train", *MULTINODE_RUN, f"train.output_dir={out}"], out.parent / "train.log")
    return out


@pytest.fixture(scope="session")
def reference_sweep(reference_run):
    """The sweep of the reference model on one node, 2 processes: the table every launcher must give."""
    out = reference_run.parent / "sweep"
    model = f"models=[{{name: cdiv, path: {reference_run}/final}}]"
    torchrun_reference(["sweep", *SWEEP, model, f"output_dir={out}"], reference_run.parent / "sweep.log")
    return out
