"""The Ray entry points' argument handling and error reporting, without a cluster (fast)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from recall_dist.configtree import ConfigError
from recall_dist.data.validation import DataError
from recall_dist.train.rundir import RunDirError
from tests.launch.runs import REPO


def test_bad_placement_strategy_is_refused_naming_the_key_and_the_choices():
    r = subprocess.run(
        [sys.executable, "launch/ray_train.py", "configs/tiny_cpu.yaml", "ray.placement_strategy=EVERYWHERE"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ray.placement_strategy: 'EVERYWHERE' is not allowed; one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD" in (
        r.stderr
    ), r.stderr


@pytest.mark.parametrize(
    "error",
    [ConfigError("train.lr", "-1 is not allowed"), RunDirError("train.output_dir", "in use"), DataError("bad row 3")],
    ids=lambda e: type(e).__name__,
)
def test_config_errors_cross_process_boundaries(error):
    """A Ray worker's exception reaches the driver pickled: it must come back whole, not as a
    TypeError from a constructor that wants other arguments."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.key == error.key and str(back) == str(error)
