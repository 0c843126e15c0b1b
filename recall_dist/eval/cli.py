"""``recall-dist sweep CONFIG.yaml [key=value ...]``: run the temperature sweep in this process, or
as one rank of torchrun / srun (every rank runs the same command; rank 0 writes the tables).  The ranks
join one gloo group through ``distributed/process_group.py``, as the trainer's do (srun: ``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` with ``MASTER_ADDR``/``MASTER_PORT``).

    recall-dist sweep configs/sweep.yaml output_dir=runs/sweep1 temperatures=[0.5,1,2]
    torchrun --nproc-per-node 2 -m recall_dist sweep configs/sweep.yaml
    recall-dist sweep configs/sweep.yaml --shard 3 --num-shards 8   # one shard only (e.g. a job array)
    recall-dist sweep configs/sweep.yaml --aggregate-only --num-shards 8
"""

from __future__ import annotations

import argparse
import sys

from recall_dist.configtree import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="sweep YAML (see configs/sweep.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_samples=500")
    p.add_argument("--shard", type=int, default=None, help="compute only this shard, then exit")
    p.add_argument("--num-shards", type=int, default=None, help="number of shards (default: config or world size)")
    p.add_argument("--aggregate-only", action="store_true", help="only aggregate existing shard files")
    return p


def _print_table(result: dict) -> None:
    keys = [
        k
        for k in ("precision", "recall", "precision_sampled", "recall_sampled", "density", "coverage")
        if k in result["rows"][0]
    ]
    print(f"{'model':<16}{'T':>6}" + "".join(f"{k:>19}" for k in keys))
    for r in result["rows"]:
        print(f"{r['model']:<16}{r['temperature']:>6g}" + "".join(f"{r[k]:>19.4f}" for k in keys))
    for model, s in result["summary"].items():
        print(
            f"{model}: max recall {s['max_recall']:.4f} (T={s['temperature_at_max_recall']:g}), "
            f"recall at precision>={s['min_precision']:g}: {s['recall_at_precision']:.4f}, "
            f"PR AUC {s['pr_auc']:.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from recall_dist.eval.config import SweepConfig

    try:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        if cfg.metric == "known_support":  # a support file is read and checked before any rank starts
            from recall_dist.eval.tasks import build_task

            build_task(cfg)
    except ConfigError as e:
        print(f"recall-dist sweep: config error: {e}", file=sys.stderr)
        return 2
    if args.num_shards is not None:
        cfg.num_shards = args.num_shards
    from recall_dist.eval.aggregate import aggregate
    from recall_dist.eval.driver import run_sweep
    from recall_dist.eval.sweep import compute_shard

    if args.shard is not None:
        if not cfg.num_shards:
            print("recall-dist sweep: --shard needs --num-shards (or num_shards in the config)", file=sys.stderr)
            return 2
        print(compute_shard(cfg, args.shard, cfg.num_shards))
        return 0
    if args.aggregate_only:
        try:
            result = aggregate(cfg)
        except (FileNotFoundError, ValueError) as e:
            print(f"recall-dist sweep: cannot aggregate: {e}", file=sys.stderr)
            return 1
    else:
        from recall_dist.distributed.process_group import init_distributed, shutdown
        from recall_dist.distributed.ranks import rank_and_world

        # Several ranks (torchrun, srun, an existing group) share one CPU group: it carries barriers
        # only, and a rank may wait a day in one for the others' shards; the models reach each rank's
        # GPU in eval/loading.py, not through the group.  One process needs no group.
        ctx = init_distributed(timeout_minutes=24 * 60, backend="gloo") if rank_and_world()[1] > 1 else None
        try:
            result = run_sweep(cfg, ctx.rank, ctx.world_size) if ctx is not None else run_sweep(cfg, 0, 1)
        finally:
            if ctx is not None:
                shutdown(ctx)
    if result is not None:
        _print_table(result)
        print(f"wrote {cfg.output_dir}/sweep.csv, sweep.json, pr_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
