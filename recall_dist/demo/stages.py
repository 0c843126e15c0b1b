"""One stage of a demo: ``recall-dist ARGS`` as a ``torchrun --nproc-per-node 2`` subprocess of the real
CLI in the package's directory, its output in a log file, a progress line on the console, one retry."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The directory that holds the recall_dist package (the source checkout, or site-packages when installed):
# the stages' subprocesses run there and import this same package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


class DemoError(RuntimeError):
    pass


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def torchrun(*target: str) -> list[str]:
    """The command that runs ``target`` (``-m module ...`` or ``script.py ...``) in 2 local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target]


# Bars that are not the stage's own: Hugging Face's weight loading (one per model a sweep loads, counting
# tensors: "236/236" read as the sweep's progress).
_FOREIGN_BARS = ("Loading weights", "Loading checkpoint shards")


def _tqdm_progress(log: Path) -> str:
    """'123/500' from the last update of the stage's own tqdm bar in ``log`` (rank 0's), or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    for update in reversed(re.split(r"[\r\n]", tail)):
        found = re.findall(r"(\d+)/(\d+) \[", update)
        if found and not any(bar in update for bar in _FOREIGN_BARS):
            return f"{found[-1][0]}/{found[-1][1]}"
    return ""


def _run_once(label: str, what: str, args: list[str], log: Path, demo_start: float) -> tuple[int, float]:
    """Run ``torchrun --nproc-per-node 2 -m recall_dist ARGS`` with its output in ``log``, printing
    progress; return (exit code, seconds)."""
    cmd = torchrun("-m", "recall_dist", *args)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    start, last_print, tty = time.monotonic(), 0.0, sys.stdout.isatty()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=PACKAGE_PARENT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                now = time.monotonic()
                if tty or now - last_print >= 15:
                    step = _tqdm_progress(log)
                    line = (
                        f"{label} {what}: {step or 'starting'}  ({fmt_time(now - start)}, "
                        f"demo {fmt_time(now - demo_start)})"
                    )
                    print(f"\r{line:<90}" if tty else line, end="" if tty else "\n", flush=True)
                    last_print = now
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if tty:
        print("\r" + " " * 90 + "\r", end="")
    return proc.returncode, time.monotonic() - start


def run_stage(
    label: str, what: str, args: list[str], log: Path, demo_start: float, run_dir: Path | None = None, attempts: int = 2
) -> float:
    """``_run_once``, retried once: a worker of the CPU gloo runs occasionally aborts in teardown
    after finishing (exit -6, "terminate called without an active exception"), so one retry, announced
    on the console, keeps the demo from dying of that.  For a training stage (``run_dir``), a run whose
    export ``final/`` was written before the abort counts as done, and a retry starts from an empty
    ``run_dir`` (the trainer refuses to start over in a used one).  A stage that fails twice raises
    ``DemoError`` naming it and its log.  Returns the seconds of the successful attempt."""
    for attempt in range(1, attempts + 1):
        code, seconds = _run_once(label, what, args, log, demo_start)
        finished = run_dir is not None and (run_dir / "final" / "config.json").is_file()
        if code == 0 or finished:
            note = "" if code == 0 else f" (exit code {code} after the export; the model is complete)"
            print(
                f"{label} {what}: done in {fmt_time(seconds)}{note}  (demo {fmt_time(time.monotonic() - demo_start)})",
                flush=True,
            )
            return seconds
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        if attempt < attempts:
            kept = log.with_suffix(f".attempt{attempt}.log")
            log.replace(kept)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"{label} {what}: FAILED (exit code {code}, log {kept}); retrying once", flush=True)
    raise DemoError(
        f"{what} failed (exit code {code}, {attempts} attempts); full log: {log}\n--- last lines ---\n{tail}"
    )
