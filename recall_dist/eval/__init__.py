"""Temperature-sweep evaluation (README, "Temperature sweep"): exact and sampled known-support Precision/Recall,
k-NN text Precision/Recall, summary numbers, and the sharded sweep that writes the table and plot.

Entry points for drivers: ``sweep.compute_shard(cfg, shard_index, num_shards)`` and
``aggregate.aggregate(cfg, num_shards)``; config: ``config.SweepConfig``.
"""

from recall_dist.eval.aggregate import aggregate
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.sweep import compute_shard, run_sweep, work_items

__all__ = ["SweepConfig", "aggregate", "compute_shard", "run_sweep", "work_items"]
