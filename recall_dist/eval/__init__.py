"""Temperature-sweep evaluation (README, "Temperature sweep"): exact and sampled known-support
Precision/Recall, k-NN text Precision/Recall, summary numbers, and the sharded sweep that writes
the table and plot.

Layers, each importing only those before it: ``config`` (``SweepConfig``) -> ``plan`` (work items,
shard files and keys) -> ``sweep`` (``compute_shard``: run the models) -> ``aggregate`` (tables,
plot) -> ``driver`` (``run_sweep`` under torchrun / srun).  ``launch/ray_sweep.py`` drives
``compute_shard``, ``compute_text_part`` and ``aggregate`` as Ray tasks.
"""

from recall_dist.eval.aggregate import aggregate, compute_text_part
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.driver import run_sweep
from recall_dist.eval.shards import work_items
from recall_dist.eval.sweep import compute_shard

__all__ = ["SweepConfig", "aggregate", "compute_shard", "compute_text_part", "run_sweep", "work_items"]
