"""``recall-dist train CONFIG.yaml [key=value ...]``: validate the config, then run the trainer.

Works under torchrun, the ``deepspeed`` launcher, srun, or as a single process.  Exit codes:
0 done or preempted (checkpoint saved, ``PREEMPTED`` written), 2 config error (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from recall_dist.configtree import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="YAML training config (e.g. configs/cdiv.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.params.alpha=1.4 model=olmo-1b")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from recall_dist.train.config import load_train_config, validate_resources
    from recall_dist.train.trainer import run_training

    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.check:
            validate_resources(cfg)
            print(f"config OK: {args.config}")
            return 0
        summary = run_training(cfg)
    except ConfigError as e:
        print(f"recall-dist train: config error: {e}", file=sys.stderr)
        return 2
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}: checkpoint saved; resume with resume=auto", file=sys.stderr)
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
