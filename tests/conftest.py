"""Test-wide settings: CPU-only DeepSpeed, quiet tokenizers, deterministic small thread pools."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

# Without a GPU the Triton kernels run through Triton's CPU interpreter, which must be chosen before
# triton is first imported (its own library functions are decorated then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs 2 workers) each worker takes its share of the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


import pytest  # noqa: E402  (after the environment settings above)


def _is_cluster_test(nodeid: str) -> bool:
    return nodeid.startswith("tests/launch/test_") and "test_ray_args" not in nodeid


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: plain `pytest` (or -p no:xdist) runs too
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (`make test` runs 2 workers) hands out whole files, and all the tests that start
    real clusters as one unit: they run one after another on one worker (they share the session's
    Slurm cluster, and the two-host network exists once per machine).  A file as a unit builds its
    module fixtures (a demo run, a trained model) once.  The clusters' waits on schedulers and daemons
    overlap with the CPU-bound tests of the other worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFileClustersTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if _is_cluster_test(nodeid) else nodeid.split("::")[0]

    return ByFileClustersTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The cluster tests first: the longest unit never runs alone at the end."""
    items[:] = sorted(items, key=lambda item: not _is_cluster_test(item.nodeid))
