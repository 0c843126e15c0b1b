"""``<output_dir>/LOCK``: an output directory belongs to one run.  ``OutputDirLock`` (host, pid, start
time), taken by rank 0; a second run gets an error naming the holder, a stale lock is taken over.

A lock is stale when its process is gone (same host), or its heartbeat (the file's mtime, refreshed
every ``HEARTBEAT_S``) is older than ``STALE_AFTER_S`` (another host, whose processes we cannot see).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from recall_dist.log import get_logger
from recall_dist.train.rundir.errors import RunDirError
from recall_dist.train.rundir.layout import utc_now

log = get_logger("train")
LOCK_NAME = "LOCK"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


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
            "started": utc_now(),
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
