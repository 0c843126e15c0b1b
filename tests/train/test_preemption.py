"""recall_dist/train/preemption.py: ``PreemptionWatcher`` (the stop file or SIGTERM / SIGUSR1 set the flag;
the ranks agree by an all-reduce MAX, 2 gloo processes; the previous handlers come back on ``close``),
``write_outcome`` (the JSON that ``recall-dist torchrun`` reads, local rank 0 only) and ``die_with_parent``
(a child process dies with its parent, by the signal asked for; a control child without it survives)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.preemption import OUTCOME_FILE_ENV, STOP_FILE_ENV, PreemptionWatcher, write_outcome

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def watcher():
    made: list[PreemptionWatcher] = []
    yield lambda *args, **kwargs: made.append(PreemptionWatcher(*args, **kwargs)) or made[-1]
    for w in made:
        w.close()


def _until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- one process


def test_the_stop_file_sets_the_flag_while_it_exists(tmp_path, monkeypatch, watcher):
    stop = tmp_path / "STOP"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    w = watcher()
    assert not w.requested_locally() and not w.should_stop()
    stop.touch()
    assert w.requested_locally() and w.should_stop()
    stop.unlink()
    assert not w.should_stop()
    monkeypatch.setenv(STOP_FILE_ENV, "")  # set but empty: no file to look for (Path("") would be ".")
    assert not w.should_stop()
    monkeypatch.delenv(STOP_FILE_ENV)
    assert not w.should_stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_sets_the_flag_and_close_restores_the_handler(monkeypatch, watcher, sig):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    seen = []
    previous = signal.signal(sig, lambda signum, frame: seen.append(signum))
    try:
        w = watcher()
        assert not w.should_stop() and w.signal_received is None
        os.kill(os.getpid(), sig)  # handled by the watcher, not by the handler set before it
        assert _until(lambda: w.signal_received is not None)
        assert w.signal_received == sig and w.should_stop() and seen == []
        w.close()
        os.kill(os.getpid(), sig)  # the previous handler is back
        assert _until(lambda: seen == [sig])
    finally:
        signal.signal(sig, previous)


def test_off_the_main_thread_no_handler_but_the_stop_file_works(tmp_path, monkeypatch, watcher):
    stop = tmp_path / "STOP"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    made = []
    thread = threading.Thread(target=lambda: made.append(watcher()))  # as under Ray Train
    thread.start()
    thread.join()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    stop.touch()
    assert made[0].should_stop()


# ----------------------------------------------------------------------------- two ranks agree


def _agreement_worker(tmp: str) -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    mine = Path(tmp) / f"STOP-{rank}"  # each rank looks at its own file: only rank 1's ever exists
    os.environ[STOP_FILE_ENV] = str(mine)
    watcher = PreemptionWatcher(dist.group.WORLD)
    try:
        assert not watcher.should_stop()
        if rank == 1:
            mine.touch()
        assert watcher.should_stop(), f"rank {rank} did not stop with rank 1"
        assert watcher.requested_locally() == (rank == 1)
        dist.barrier()
        if rank == 1:
            mine.unlink()
        dist.barrier()
        assert not watcher.should_stop()
        if rank == 0:  # a signal on one rank only
            os.kill(os.getpid(), signal.SIGTERM)
            assert _until(lambda: watcher.signal_received == signal.SIGTERM)
        assert watcher.should_stop(), f"rank {rank} did not stop with rank 0's SIGTERM"
        assert watcher.requested_locally() == (rank == 0)
    finally:
        watcher.close()


def test_the_ranks_agree_on_one_ranks_request(tmp_path):
    run_distributed_test(_agreement_worker, 2, str(tmp_path), timeout=120)


# ----------------------------------------------------------------------------- write_outcome


def test_write_outcome_writes_the_launchers_json_on_local_rank_0(tmp_path, monkeypatch):
    path = tmp_path / "outcome.json"
    monkeypatch.setenv(OUTCOME_FILE_ENV, str(path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # not under torchrun: this process is local rank 0
    write_outcome("preempted", 0, step=12, output_dir="/runs/a")
    assert json.loads(path.read_text()) == {"outcome": "preempted", "exit_code": 0, "step": 12, "output_dir": "/runs/a"}
    monkeypatch.setenv("LOCAL_RANK", "0")
    write_outcome("diverged", 3)  # replaces the previous report
    assert json.loads(path.read_text()) == {"outcome": "diverged", "exit_code": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outcome.json"]  # no temporary file left

    monkeypatch.setenv("LOCAL_RANK", "1")
    write_outcome("failed", 1)
    assert json.loads(path.read_text())["exit_code"] == 3  # another local rank never writes


def test_write_outcome_without_the_variable_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(OUTCOME_FILE_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    write_outcome("finished", 0)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- die_with_parent

# The parent starts three children, waits until each is ready, prints their pids and exits at once.
PARENT = """
import json, subprocess, sys, time
from pathlib import Path

tmp = Path(sys.argv[1])
children = {  # not on our pipes: the test reads them to their end, which would wait for the children
    mode: subprocess.Popen(
        [sys.executable, "-c", sys.argv[2], str(tmp), mode],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"stderr-{mode}", "w"),
    )
    for mode in sys.argv[3:]
}
deadline = time.monotonic() + 60
while not all((tmp / f"ready-{mode}").exists() for mode in children):
    if time.monotonic() > deadline or any(c.poll() is not None for c in children.values()):
        sys.exit("a child failed: " + " | ".join((tmp / f"stderr-{mode}").read_text() for mode in children))
    time.sleep(0.02)
print(json.dumps({mode: c.pid for mode, c in children.items()}), flush=True)
"""

CHILD = """
import os, signal, sys, time
from pathlib import Path
from recall_dist.train.preemption import die_with_parent

tmp, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "sigterm":
    signal.signal(signal.SIGTERM, lambda *_: ((tmp / "got-sigterm").write_text(str(os.getpid())), os._exit(0)))
    assert die_with_parent(signal.SIGTERM)
elif mode == "default":
    assert die_with_parent()
(tmp / f"ready-{mode}").touch()
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # orphaned, not reaped here
    except psutil.NoSuchProcess:
        return True


def test_die_with_parent(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", PARENT, str(tmp_path), CHILD, "default", "sigterm", "control"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = json.loads(proc.stdout)
    try:
        assert _until(lambda: _gone(pids["default"])), "the child did not die with its parent"
        assert _until((tmp_path / "got-sigterm").exists), "no SIGTERM when the parent died"
        assert (tmp_path / "got-sigterm").read_text() == str(pids["sigterm"])
        assert _until(lambda: _gone(pids["sigterm"]))
        time.sleep(0.5)
        assert not _gone(pids["control"]), "the control child died too: the test shows nothing"
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
