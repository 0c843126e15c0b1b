"""The temperature sweep on a Ray cluster: one Ray task per shard (``compute_shard``); for text
sweeps one Ray task per k-NN part (``compute_text_part``, as many parts as shards); then
``aggregate`` in the driver (table + PR-curve plot).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_sweep.py configs/sweep.yaml 'models=[{name: cdiv, path: /shared/runs/cdiv/final}]' \\
        [ray.num_shards=8 ray.num_gpus_per_task=1]

Arguments are those of ``recall-dist sweep`` (a config and ``key=value`` overrides) plus ``ray.*`` keys
(``RaySweepConfig``).  Shards are independent and their files are written atomically, so a task that
dies is retried (``ray.max_retries``) and a re-submitted sweep only computes the missing shards; the
numbers do not depend on the number of shards (seeds come from model, temperature, prompt and sample).
Relative ``output_dir`` and model paths are taken under ``$RECALL_DIST_OUTPUT_ROOT`` (default
``~/recall_dist``, as ``launch/ray_train.py`` does): the job's working dir is a temporary copy.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import recall_dist  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_cli import split_args, under_output_root

from recall_dist.configtree import ConfigError, apply_overrides, check, from_dict, load_yaml


@dataclass
class RaySweepConfig:
    """How the sweep is spread over the Ray cluster (``ray.key=value`` on the command line)."""

    num_shards: int | None = None  # None: the sweep config's num_shards, else the cluster's CPUs / cpus_per_task
    cpus_per_task: float = 1.0
    num_gpus_per_task: float = 0.0
    max_retries: int = 2  # per shard task, when its worker process dies

    def __post_init__(self):
        check(self.num_shards is None or self.num_shards >= 1, "num_shards", self.num_shards, "an integer >= 1")
        check(self.cpus_per_task > 0, "cpus_per_task", self.cpus_per_task, "a number > 0")
        check(self.num_gpus_per_task >= 0, "num_gpus_per_task", self.num_gpus_per_task, "a number >= 0")
        check(self.max_retries >= 0, "max_retries", self.max_retries, "an integer >= 0")


def parse_args(argv: list[str]):
    """``CONFIG.yaml [key=value ...]`` -> (SweepConfig, RaySweepConfig)."""
    from recall_dist.eval.config import SweepConfig

    config, overrides, ray_cfg = split_args(argv, RaySweepConfig, __doc__)
    data = apply_overrides(load_yaml(config), overrides)
    data["output_dir"] = under_output_root(data.get("output_dir", "runs/sweep"))
    for model in data.get("models") or []:
        if isinstance(model, dict) and isinstance(model.get("path"), str):
            model["path"] = under_output_root(model["path"])
    cfg = from_dict(SweepConfig, data)
    if cfg.metric == "known_support":  # a support file is read and checked before any task is submitted
        from recall_dist.eval.tasks import build_task

        build_task(cfg)
    return cfg, ray_cfg


def run(cfg, ray_cfg: RaySweepConfig) -> dict:
    import ray

    from recall_dist.eval.aggregate import aggregate

    num_shards = (
        ray_cfg.num_shards
        or cfg.num_shards
        or max(1, int(ray.cluster_resources().get("CPU", 1) // ray_cfg.cpus_per_task))
    )
    shard_task = ray.remote(
        num_cpus=ray_cfg.cpus_per_task, num_gpus=ray_cfg.num_gpus_per_task, max_retries=ray_cfg.max_retries
    )(_compute_shard)
    paths = ray.get([shard_task.remote(cfg, i, num_shards) for i in range(num_shards)])
    print(f"ray_sweep: {num_shards} shard(s) written: {paths}", flush=True)
    if cfg.metric != "text":
        return aggregate(cfg, num_shards)
    part_task = ray.remote(num_cpus=ray_cfg.cpus_per_task, max_retries=ray_cfg.max_retries)(_compute_text_part)
    parts = ray.get([part_task.remote(cfg, i, num_shards, num_shards) for i in range(num_shards)])
    print(f"ray_sweep: {num_shards} k-NN part(s) written: {parts}", flush=True)
    return aggregate(cfg, num_shards, num_parts=num_shards)


def _compute_shard(cfg, shard_index: int, num_shards: int) -> str:
    import torch

    from recall_dist.eval.sweep import compute_shard

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # one task per CPU
    return str(compute_shard(cfg, shard_index, num_shards, progress=False))


def _compute_text_part(cfg, part: int, num_parts: int, num_shards: int) -> str:
    from recall_dist.eval.aggregate import compute_text_part

    return str(compute_text_part(cfg, part, num_parts, num_shards))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, ray_cfg = parse_args(argv)
    except ConfigError as e:
        print(f"ray_sweep: config error: {e}", file=sys.stderr)
        return 2
    import ray

    ray.init()  # inside `ray job submit`: the job's cluster
    print(f"ray_sweep: {ray_cfg} -> {cfg.output_dir}", flush=True)
    result = run(cfg, ray_cfg)
    print(json.dumps({"summary": result["summary"]}, indent=1, default=str))
    print(f"ray_sweep: wrote {cfg.output_dir}/sweep.csv, sweep.json, pr_curve.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
