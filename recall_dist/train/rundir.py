"""An output directory belongs to one run: its lock, the experiment fingerprint, and what a new run may
do to an earlier run's files (never delete them).  docs/robustness.md has the user-facing rules.

- ``OutputDirLock``: ``<output_dir>/LOCK`` (host, pid, start time), taken by rank 0; a second run gets an
  error naming the holder.  A stale lock is taken over: its process is gone (same host), or its
  heartbeat (the file's mtime, refreshed every ``HEARTBEAT_S``) is older than ``STALE_AFTER_S`` (another
  host, whose processes we cannot see).
- ``check_same_experiment``: a checkpoint carries the keys that define the experiment (model, loss, optim,
  data; ``fingerprint.py``); a resume with other values stops with the list of differences.
- ``prepare_output_dir``: a used directory is continued (``resume: auto``), or refused, or with
  ``train.overwrite`` its run is moved to ``<output_dir>/previous_runs/<time>/``.
- ``open_run``: all of the above for a starting run, decided by rank 0 and shared with every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from recall_dist.configtree import ConfigError, to_dict
from recall_dist.distributed.ranks import on_rank0
from recall_dist.log import get_logger
from recall_dist.train.checkpoint import Checkpointer, checkpoint_step, latest_checkpoint
from recall_dist.train.fingerprint import config_fingerprint, fingerprint_differences, read_fingerprint

log = get_logger("train")
LOCK_NAME = "LOCK"
PREVIOUS_RUNS = "previous_runs"
# What a run writes in its output_dir; the rest (Ray's run state ``ray/``, Slurm's STOP file, the user's
# own files) belongs to someone else and is neither counted nor moved.
RUN_FILES = ("checkpoints", "metrics.jsonl", "final", ".tmp-final", "PREEMPTED", "DIVERGED", "tensorboard", "wandb")
DIVERGED = "DIVERGED"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirError(ConfigError):
    """The output directory cannot be used as asked (another run holds it, it holds another run, or
    the checkpoint is another experiment).  Nothing was changed; exit code 2 like a config error."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- lock


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None, path: Path) -> str:
    age = ""
    with contextlib.suppress(OSError):
        age = f", last heartbeat {time.time() - path.stat().st_mtime:.0f} s ago"
    if holder is None:
        return f"a lock file being written or unreadable{age}"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}{age}"


_HELD_HERE: set[str] = set()  # lock paths this process holds (a second run_training in it must not steal)


def stale_reason(holder: dict | None, path: Path) -> str | None:
    """Why the lock at ``path`` (content ``holder``) no longer protects a live run, or None if it does."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if holder is None:  # being written right now, or garbage
        return f"it is unreadable and {age:.0f} s old" if age > 60 else None
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return None if str(path) in _HELD_HERE else "it was left by this process"
        if not _pid_alive(pid):
            return f"process {pid} is not running"
        start = holder.get("pid_start")
        if start is not None and _process_start(pid) not in (None, start):
            return f"pid {pid} now belongs to another process"
        return None
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago (host {holder.get('host')} is not this host)"
    return None


class OutputDirLock:
    """``<output_dir>/LOCK``, held from ``acquire()`` to ``release()``; a daemon thread refreshes its
    mtime (the heartbeat other hosts judge it by)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": _now(),
            "command": " ".join(sys.argv)[:500],
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _HELD_HERE.add(str(self.path))
            self._thread = threading.Thread(target=self._heartbeat, name="recall-dist-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirError("train.output_dir", f"{self.path.parent}: could not take {self.path} (contended)")

    def _take_over_if_stale(self) -> None:
        holder = _read_holder(self.path)
        if holder is None:
            time.sleep(0.2)  # its writer may be between create and write
            holder = _read_holder(self.path)
        reason = stale_reason(holder, self.path)
        if reason is None:
            raise RunDirError(
                "train.output_dir",
                f"{self.path.parent} is in use by another run ({_describe(holder, self.path)}; lock file "
                f"{self.path}). Wait for it to end, or use another train.output_dir; if that run is gone "
                f"(a host that died: its lock goes stale {STALE_AFTER_S:.0f} s after its last heartbeat), "
                f"delete {self.path}.",
            )
        grave = self.path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if _read_holder(grave) != holder:  # another starter replaced it between our read and rename
            with contextlib.suppress(FileExistsError):
                os.link(grave, self.path)
        else:
            log.warning("taking over the stale lock %s (%s)", self.path, reason)
        grave.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.warning("lock file %s was removed", self.path)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _HELD_HERE.discard(str(self.path))
        holder = _read_holder(self.path)
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- experiment


def check_same_experiment(saved: dict, current: dict, checkpoint: Path, allow_change: bool) -> list[str]:
    """Raise ``RunDirError`` listing the differences unless ``allow_change``; returns them."""
    diff = fingerprint_differences(saved, current)
    if diff and not allow_change:
        listing = "\n  ".join(diff)
        raise RunDirError(
            "train.resume",
            f"checkpoint {checkpoint} belongs to a different experiment (checkpoint -> this config):\n  "
            f"{listing}\nResuming would continue that run under the new settings and replace its final/. "
            f"Use another train.output_dir for a new experiment, or set train.allow_config_change=true to "
            f"continue it with these settings.",
        )
    return diff


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
    (dest / "MOVED_HERE").write_text(f"moved from {out} at {_now()}: {reason}\n")
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
    if resume == "auto":
        if newest_step is not None:
            return resume, None
        dest = move_aside(out, "train.resume=auto found no complete checkpoint to continue")
        return resume, f"no complete checkpoint to resume in {out}: starting over; its files were moved to {dest}"
    continues_here = resume != "none" and _inside(Path(resume), out / "checkpoints") and resume_step == newest_step
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


def mark_diverged(output_dir: str | Path, report: dict) -> Path:
    path = Path(output_dir) / DIVERGED
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def clear_diverged(output_dir: str | Path) -> None:
    (Path(output_dir) / DIVERGED).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ start-up


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
            newest = latest_checkpoint(out / "checkpoints")
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
