"""The distributed test runner reports a failing rank (and passes a passing run)."""

import pytest
import torch.distributed as dist

from recall_dist.distributed.testing import run_distributed_test


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")


def _all_pass():
    assert dist.get_world_size() == 2


def test_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(AssertionError, match=r"rank 1 of 2 failed:(.|\n)*planted failure on rank 1"):
        run_distributed_test(_rank_one_fails, 2, timeout=60)


def test_passing_run():
    run_distributed_test(_all_pass, 2, timeout=60)
