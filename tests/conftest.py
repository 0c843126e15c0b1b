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


def pytest_collection_modifyitems(config, items):
    """The tests that start real clusters run one after another on one xdist worker (they share the
    session's Slurm cluster, and the two-host network is one per machine); the rest spread over the
    workers file by file.  The clusters' waits on schedulers and daemons overlap with the CPU-bound tests."""
    import pytest

    cluster = [item for item in items if item.get_closest_marker("cluster")]
    for item in items:
        # Other tests go by file, so a module-scoped fixture (a demo run, a trained model) is built once.
        item.add_marker(pytest.mark.xdist_group("cluster" if item in cluster else item.nodeid.split("::")[0]))
    # The longest group first, so that it never runs alone at the end.
    items[:] = cluster + [item for item in items if not item.get_closest_marker("cluster")]
