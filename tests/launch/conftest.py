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
