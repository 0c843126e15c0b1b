"""Fixtures of the launcher tests: a real local Slurm cluster (one per session)."""

from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import SlurmCluster, SlurmError


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


@pytest.fixture(scope="session")
def ray_head():
    """A running Ray head on 127.0.0.1 (2 CPUs, dashboard/job server on), stopped by PID at the end."""
    from tests.launch.ray_cluster import RayHead

    head = RayHead(num_cpus=2, env={"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"})
    try:
        head.start()
        yield head
    finally:
        head.stop()
        head.cleanup()
