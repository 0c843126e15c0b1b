"""A run's output directory, start to end: its lock (``lock.py``), what it holds and how an earlier run
is moved aside (``layout.py``), checkpoints (``checkpointer.py``, ``state.py``, ``manifest.py``) and the
experiment they belong to (``experiment.py``).  docs/robustness.md has the user-facing rules.

``open_run``: all of it for a starting run, decided by rank 0 and shared with every rank.  The names
below are the API the trainer uses; tests and tools reach into the modules for the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recall_dist.configtree import ConfigError, to_dict
from recall_dist.distributed.ranks import on_rank0
from recall_dist.log import get_logger
from recall_dist.train.rundir.checkpointer import (
    COMPLETE,
    Checkpointer,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
)
from recall_dist.train.rundir.errors import CheckpointDiskFull, CheckpointError, RunDirError, UnsafeCheckpoint
from recall_dist.train.rundir.experiment import check_same_experiment, config_fingerprint, read_fingerprint
from recall_dist.train.rundir.layout import (
    CHECKPOINTS,
    DIVERGED,
    FINAL,
    NO_FINAL_CHECKPOINT,
    PREEMPTED,
    PREVIOUS_RUNS,
    clear_diverged,
    clear_preempted,
    mark_diverged,
    mark_no_final_checkpoint,
    mark_preempted,
    prepare_output_dir,
)
from recall_dist.train.rundir.lock import LOCK_NAME, OutputDirLock
from recall_dist.train.rundir.state import rng_state, set_rng_state

__all__ = [
    "CHECKPOINTS",
    "COMPLETE",
    "DIVERGED",
    "FINAL",
    "LOCK_NAME",
    "NO_FINAL_CHECKPOINT",
    "PREEMPTED",
    "PREVIOUS_RUNS",
    "CheckpointDiskFull",
    "CheckpointError",
    "Checkpointer",
    "OutputDirLock",
    "RunDirError",
    "UnsafeCheckpoint",
    "checkpoint_step",
    "clear_diverged",
    "clear_preempted",
    "complete_checkpoints",
    "latest_checkpoint",
    "mark_diverged",
    "mark_no_final_checkpoint",
    "mark_preempted",
    "open_run",
    "rng_state",
    "set_rng_state",
]

log = get_logger("train")


def _as_seen_elsewhere(error: Exception) -> Exception:
    """What the other ranks raise when rank 0's decision failed: a ``ConfigError`` as a ``RunDirError``
    with the same text (exit code 2 on every rank), anything else as a ``RuntimeError`` naming it."""
    if isinstance(error, ConfigError):
        return RunDirError("", str(error))
    return RuntimeError(f"on rank 0: {type(error).__name__}: {error}")


def _on_rank0(fn, ctx):
    """``fn()`` decided on rank 0 (the lock, the directory, the fingerprint), its result on every rank."""
    return on_rank0(fn, ctx.dp_group, _as_seen_elsewhere)


def _log(ctx, message: str, level: int = logging.INFO) -> None:
    if ctx.rank == 0:
        log.log(level, message)


def open_run(cfg, ctx) -> tuple[OutputDirLock | None, Path | None]:
    """Collective start-up of a run in ``cfg.train.output_dir``: take its lock (rank 0), apply the rules
    for a used directory, pick the checkpoint to resume (verified; fallback on a damaged one) and check
    it is the same experiment.  Returns (the lock on rank 0 / None elsewhere, the checkpoint or None)."""
    out, train = Path(cfg.train.output_dir), cfg.train
    held: list[OutputDirLock] = []
    _on_rank0(lambda: held.append(OutputDirLock(out).acquire()), ctx)
    lock = held[0] if held else None
    try:

        def decide():
            newest = latest_checkpoint(out / CHECKPOINTS)
            explicit = train.resume not in ("auto", "none")
            return prepare_output_dir(
                out,
                train.resume,
                train.overwrite,
                None if newest is None else checkpoint_step(newest),
                checkpoint_step(train.resume) if explicit and Path(train.resume).name.startswith("step_") else None,
            )

        resume, note = _on_rank0(decide, ctx)
        if note:
            _log(ctx, note)
        start = Checkpointer(out, ctx.rank, train.keep_checkpoints, train.verify_checkpoints).select(resume)
        if start is not None:
            current = config_fingerprint(to_dict(cfg))
            diff = _on_rank0(
                lambda: check_same_experiment(read_fingerprint(start), current, start, train.allow_config_change), ctx
            )
            if diff:
                _log(
                    ctx,
                    f"train.allow_config_change: resuming {start} with changed settings:\n  " + "\n  ".join(diff),
                    logging.WARNING,
                )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, start
