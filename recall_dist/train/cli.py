"""``recall-dist train CONFIG.yaml [key=value ...]``: validate the config and the data, then run the trainer.

Works under torchrun (better: ``recall-dist torchrun``), the ``deepspeed`` launcher, srun, or as a single
process.  Exit codes (docs/robustness.md):
  0  finished; or stopped on request after saving a checkpoint (``<output_dir>/PREEMPTED`` holds the step:
     requeue / run again with train.resume=auto)
  1  failed (a crash, a full disk, a damaged or refused checkpoint); the message says which
  2  refused to start, nothing trained: config error, bad data file, output_dir in use or holding
     another run, a checkpoint of a different experiment
  3  diverged: train.max_bad_steps consecutive non-finite steps; no export (``<output_dir>/DIVERGED``)
"""

from __future__ import annotations

import argparse
import json
import sys

from recall_dist.configtree import ConfigError
from recall_dist.distributed.ranks import env_rank

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_DIVERGED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config", help="YAML training config (e.g. configs/cdiv.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.params.alpha=1.4 model=olmo-1b")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--check", action="store_true", help="validate the config and the data file, and exit")
    return p


def _is_rank0() -> bool:
    return env_rank() == 0  # before (or without) a process group


def _say(message: str, everywhere: bool = False) -> None:
    """Errors every rank hits alike are printed once (rank 0); a rank's own failure by that rank."""
    if everywhere or _is_rank0():
        print(f"recall-dist train: {message}", file=sys.stderr, flush=True)


def _run(args) -> tuple[str, int, dict]:
    from recall_dist.data.validation import DataError, validate_data_source
    from recall_dist.io import is_disk_full
    from recall_dist.train.config import load_train_config
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.rundir import CheckpointError, RunDirError
    from recall_dist.train.trainer import TrainingDiverged, run_training

    cfg = None
    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.check:
            validate_data_source(cfg.data, validate_resources(cfg.with_environment()))  # as run_training does
            print(f"config OK: {args.config}")
            return "checked", EXIT_OK, {}
        summary = run_training(cfg)
    except DataError as e:
        _say(f"data error: {e}")
        return "refused: data error", EXIT_REFUSED, {}
    except RunDirError as e:
        _say(f"cannot start: {e}")
        return "refused: output_dir", EXIT_REFUSED, {}
    except ConfigError as e:
        _say(f"config error: {e}")
        return "refused: config error", EXIT_REFUSED, {}
    except TrainingDiverged as e:
        _say(str(e))
        return "diverged", EXIT_DIVERGED, {"step": e.step}
    except CheckpointError as e:
        _say(f"error: {e}", everywhere=True)
        return f"failed: {type(e).__name__}", EXIT_FAILED, {}
    except OSError as e:
        if cfg is None or not is_disk_full(e, cfg.train.output_dir):
            raise
        _say(f"disk full under {cfg.train.output_dir}: {e}", everywhere=True)
        return "failed: disk full", EXIT_FAILED, {}
    if summary.get("preempted"):
        _say(f"preempted at step {summary['step']}: checkpoint saved; resume with resume=auto")
    if _is_rank0():
        print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    outcome = "preempted: checkpoint saved" if summary.get("preempted") else "finished"
    return outcome, EXIT_OK, {"step": summary["step"]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from recall_dist.train.preemption import write_outcome

    outcome, code, details = "failed: uncaught exception (traceback above)", EXIT_FAILED, {}
    try:
        outcome, code, details = _run(args)
    finally:
        write_outcome(outcome, code, **details)
    return code


if __name__ == "__main__":
    sys.exit(main())
