"""What a run writes in its output directory (``RUN_FILES``, ``checkpoints/``, ``final/``, the PREEMPTED
and DIVERGED markers), and what a new run may do with an earlier run's files: move them aside, never delete.

- ``prepare_output_dir``: a used directory is continued (``resume: auto``), or refused, or with
  ``train.overwrite`` its run is moved to ``<output_dir>/previous_runs/<time>/``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from recall_dist.train.rundir.errors import RunDirError

CHECKPOINTS = "checkpoints"
FINAL = "final"
PREEMPTED = "PREEMPTED"  # a stop on request: the step of the checkpoint saved (train/preemption.py)
DIVERGED = "DIVERGED"  # train.max_bad_steps non-finite steps in a row: the report
# A run that finished with train.final_checkpoint false: its end has no checkpoint, it cannot be continued
NO_FINAL_CHECKPOINT = "NO_FINAL_CHECKPOINT"
PREVIOUS_RUNS = "previous_runs"
# What a run writes in its output_dir; the rest (Ray's run state ``ray/``, Slurm's STOP file, the user's
# own files) belongs to someone else and is neither counted nor moved.
RUN_FILES = (
    CHECKPOINTS,
    "metrics.jsonl",
    FINAL,
    ".tmp-final",
    PREEMPTED,
    DIVERGED,
    NO_FINAL_CHECKPOINT,
    "tensorboard",
    "wandb",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- markers


def mark_preempted(output_dir: str | Path, step: int) -> Path:
    path = Path(output_dir) / PREEMPTED
    path.write_text(f"{step}\n")
    return path


def clear_preempted(output_dir: str | Path) -> None:
    (Path(output_dir) / PREEMPTED).unlink(missing_ok=True)


def mark_diverged(output_dir: str | Path, report: dict) -> Path:
    path = Path(output_dir) / DIVERGED
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def clear_diverged(output_dir: str | Path) -> None:
    (Path(output_dir) / DIVERGED).unlink(missing_ok=True)


def mark_no_final_checkpoint(output_dir: str | Path, report: dict) -> Path:
    """Written after ``final/`` when a finished run saved no checkpoint of its last step: a later start in
    this directory is refused (``prepare_output_dir``) instead of re-training from an older checkpoint
    and replacing ``final/``."""
    path = Path(output_dir) / NO_FINAL_CHECKPOINT
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------ used directories


def run_files(output_dir: str | Path) -> list[str]:
    """The entries of ``RUN_FILES`` present in ``output_dir`` (an empty directory does not count)."""
    out = Path(output_dir)
    found = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(name)
    return found


def move_aside(output_dir: str | Path, reason: str) -> Path:
    """Move this directory's run files to ``previous_runs/<UTC time>/`` (renames: nothing is copied or
    deleted) with a note saying why; returns that directory."""
    out = Path(output_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = out / PREVIOUS_RUNS / stamp
    n = 1
    while dest.exists():
        dest, n = out / PREVIOUS_RUNS / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for name in run_files(out):
        os.rename(out / name, dest / name)
    (dest / "MOVED_HERE").write_text(f"moved from {out} at {utc_now()}: {reason}\n")
    return dest


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def prepare_output_dir(
    output_dir: str | Path, resume: str, overwrite: bool, newest_step: int | None, resume_step: int | None
) -> tuple[str, str | None]:
    """Decide what a starting run does with ``output_dir`` (rank 0, under the lock).

    ``newest_step``: the newest complete checkpoint there (None: none); ``resume_step``: the step of an
    explicit ``resume`` path.  Returns ``(resume, note)``: the resume setting to use (a path may move
    with the old run) and a message for the log, or raises ``RunDirError``."""
    out = Path(output_dir)
    found = run_files(out)
    if not found:
        return resume, None
    if NO_FINAL_CHECKPOINT in found and not overwrite:
        raise RunDirError(
            "train.output_dir",
            f"{out} holds a finished run without a checkpoint of its last step (train.final_checkpoint was "
            f"false; {out / NO_FINAL_CHECKPOINT}): it cannot be continued, and re-training it from an older "
            f"checkpoint would replace its final/. Use another train.output_dir, or set train.overwrite=true "
            f"to move it, final/ included, to {out / PREVIOUS_RUNS}/<time>/ and start over.",
        )
    finished = NO_FINAL_CHECKPOINT in found  # and overwrite: moved aside below, never continued
    if finished and resume == "auto":
        resume = "none"
    if resume == "auto":
        if newest_step is not None:
            return resume, None
        dest = move_aside(out, "train.resume=auto found no complete checkpoint to continue")
        return resume, f"no complete checkpoint to resume in {out}: starting over; its files were moved to {dest}"
    continues_here = (
        not finished and resume != "none" and _inside(Path(resume), out / CHECKPOINTS) and resume_step == newest_step
    )
    if continues_here:
        return resume, None
    if not overwrite:
        what = "start over in it" if resume == "none" else f"start from {resume} in it"
        newest = f" (newest checkpoint: step {newest_step})" if newest_step is not None else ""
        raise RunDirError(
            "train.output_dir",
            f"{out} already holds a run: {', '.join(found)}{newest}. train.resume={resume} would {what} "
            f"and mix the two runs' checkpoints and metrics. Continue that run with train.resume=auto, "
            f"use another train.output_dir, or set train.overwrite=true to move it to "
            f"{out / PREVIOUS_RUNS}/<time>/ (nothing is deleted).",
        )
    moved_path = None
    if resume != "none" and _inside(Path(resume), out):
        moved_path = Path(resume).resolve().relative_to(out.resolve())
    dest = move_aside(out, f"train.overwrite=true with train.resume={resume}")
    if moved_path is not None:  # the checkpoint to start from moved with the old run
        resume = str(dest / moved_path)
    return resume, f"train.overwrite: the previous run in {out} was moved to {dest}"
