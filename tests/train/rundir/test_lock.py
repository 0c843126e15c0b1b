"""recall_dist/train/rundir/lock.py on its own (no training): the output_dir lock and its stale cases.
Training runs through it in tests/e2e/test_nothing_lost.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recall_dist.train.rundir.errors import RunDirError
from recall_dist.train.rundir.lock import LOCK_NAME, STALE_AFTER_S, OutputDirLock

REPO = Path(__file__).resolve().parents[3]


def _hold_lock_in_subprocess(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from recall_dist.train.rundir.lock import OutputDirLock; "
        f"OutputDirLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_lock_is_refused_with_its_holder_named(tmp_path):
    proc = _hold_lock_in_subprocess(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another run \(host {socket.gethostname()}, pid {proc.pid}"):
            OutputDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = OutputDirLock(tmp_path).acquire()  # its process is gone: stale, taken over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_are_taken_over(tmp_path, capsys):
    path = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "started": "then"}
    path.write_text(json.dumps(holder))
    OutputDirLock(tmp_path).acquire().release()
    assert f"process {dead.pid} is not running" in capsys.readouterr().err

    # Another host: judged by its heartbeat (the file's mtime), since its processes cannot be seen.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(RunDirError, match="host elsewhere, pid 1"):
        OutputDirLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 10
    os.utime(path, (old, old))
    OutputDirLock(tmp_path).acquire().release()
    assert "its heartbeat stopped" in capsys.readouterr().err

    # A pid reused by an unrelated process on this host (its start time differs).
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "pid_start": "1", "started": "x"}))
    OutputDirLock(tmp_path).acquire().release()
    assert "now belongs to another process" in capsys.readouterr().err


def test_the_lock_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    import recall_dist.train.rundir.lock as lock_module

    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(tmp_path).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


def test_an_unreadable_fresh_lock_is_respected_and_an_old_one_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")  # another starter between create and write
    with pytest.raises(RunDirError, match="a lock file being written or unreadable"):
        OutputDirLock(tmp_path).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    OutputDirLock(tmp_path).acquire().release()
