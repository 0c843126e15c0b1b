"""``recall-dist torchrun`` (recall_dist/torchrun.py): the exit code a scheduler sees (the workers' report
in the outcome file, else torchrun's own code, 128 + N when it was killed by signal N), the signals (a first
SIGTERM and every SIGUSR1 touch the stop file and reach no worker; a second SIGTERM reaches the workers
through torchrun), the environment the workers get, and the scratch directory removed afterwards.

Two real runs of ``python -m recall_dist torchrun`` (real torchrun, one plain-Python worker, no training);
the run under real training jobs is tests/e2e/test_signals.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recall_dist import torchrun
from recall_dist.train.preemption import OUTCOME_FILE_ENV, STOP_FILE_ENV, write_outcome

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ the exit code


def test_the_workers_report_wins_over_torchruns_code(tmp_path, monkeypatch):
    outcome = tmp_path / "outcome.json"
    monkeypatch.setenv(OUTCOME_FILE_ENV, str(outcome))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    write_outcome("diverged", 3, step=7)  # what local rank 0 writes: the same file format on both sides
    assert torchrun._exit_code(1, outcome) == (3, "the workers report: diverged")
    assert torchrun._exit_code(-15, outcome)[0] == 3  # even when torchrun itself was signalled
    write_outcome("preempted", 0)
    assert torchrun._exit_code(1, outcome) == (0, "the workers report: preempted")


@pytest.mark.parametrize(
    "returncode,expected",
    [(0, 0), (1, 1), (2, 2), (-9, 137), (-15, 143), (-2, 130)],  # killed by signal N: 128 + N, as a shell says
)
def test_without_a_report_torchruns_own_code(tmp_path, returncode, expected):
    code, why = torchrun._exit_code(returncode, tmp_path / "missing.json")
    assert code == expected
    assert why == (
        f"torchrun was killed by signal {-returncode}"
        if returncode < 0
        else "no report from the workers: torchrun's exit code"
    )


@pytest.mark.parametrize("content", ["", "{not json", '{"outcome": "pre'])
def test_an_unreadable_report_counts_as_none(tmp_path, content):
    outcome = tmp_path / "outcome.json"
    outcome.write_text(content)  # e.g. a worker killed while writing (write_outcome itself is atomic)
    assert torchrun._exit_code(-9, outcome)[0] == 137
    assert torchrun._exit_code(4, outcome)[0] == 4


def test_help_starts_nothing(capsys, monkeypatch):
    monkeypatch.setattr(torchrun, "_start", lambda *a: pytest.fail("started torchrun for --help"))
    assert torchrun.main(["--help"]) == 0
    assert torchrun.main([]) == 0
    assert "SIGTERM or SIGUSR1" in capsys.readouterr().out


# ------------------------------------------------------------------- real runs: signals and cleanup

# The worker: notes what it sees in a log, waits for the stop file, and what it does then depends on the mode.
WORKER = """
import json, os, signal, sys, time
from pathlib import Path

log, mode = Path(sys.argv[1]), sys.argv[2]

def note(line):
    with open(log, "a") as f:
        f.write(line + "\\n")

def on_sigterm(signum, frame):
    note("SIGTERM")
    sys.exit(0)

def wait_for_stop():
    deadline = time.monotonic() + 60
    while not stop.exists():
        if time.monotonic() > deadline:
            note("timed out")
            sys.exit(5)
        time.sleep(0.02)

signal.signal(signal.SIGTERM, on_sigterm)
names = ("RECALL_DIST_STOP_FILE", "RECALL_DIST_OUTCOME_FILE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
(log.parent / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in names}))
stop = Path(os.environ["RECALL_DIST_STOP_FILE"])
note("ready")
wait_for_stop()
note("stop file")
if mode == "sigterm":  # a long checkpoint: only a signal ends it
    time.sleep(60)
    note("not signalled")
    sys.exit(6)
stop.unlink()
wait_for_stop()  # only a second SIGUSR1 can bring it back
note("stop file again")
with open(os.environ["RECALL_DIST_OUTCOME_FILE"], "w") as f:
    json.dump({"outcome": "diverged", "exit_code": 3}, f)
sys.exit(1)  # torchrun then exits 1; the report says 3
"""


def _launch(tmp_path: Path, mode: str, **env) -> tuple[subprocess.Popen, Path]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    log = tmp_path / "log.txt"
    environ = {k: v for k, v in os.environ.items() if k not in (STOP_FILE_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "recall_dist", "torchrun", "--standalone", "--nproc-per-node", "1"]
    proc = subprocess.Popen(
        [*cmd, str(worker), str(log), mode],
        cwd=tmp_path,
        env=environ,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, log


def _wait_for_line(proc: subprocess.Popen, log: Path, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and line in log.read_text().splitlines()):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"ended before {line!r}: rc {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no {line!r} in the worker's log"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def test_first_sigterm_asks_the_workers_second_one_stops_them(tmp_path):
    proc, log = _launch(tmp_path, "sigterm")
    _wait_for_line(proc, log, "ready")
    env = json.loads((tmp_path / "env.json").read_text())
    scratch = Path(env[OUTCOME_FILE_ENV]).parent
    # No stop file given: one of its own, in the scratch directory with the outcome file.
    assert Path(env[STOP_FILE_ENV]).parent == scratch and scratch.is_dir()
    assert scratch.name.startswith("recall-dist-torchrun-")
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"  # the default when the caller sets none

    os.kill(proc.pid, signal.SIGTERM)
    _wait_for_line(proc, log, "stop file")
    time.sleep(0.5)
    assert "SIGTERM" not in log.read_text().splitlines(), "the first SIGTERM reached the worker"
    assert proc.poll() is None

    os.kill(proc.pid, signal.SIGTERM)
    code, err = _finish(proc)
    assert log.read_text().splitlines() == ["ready", "stop file", "SIGTERM"]  # passed on through torchrun
    assert "SIGTERM: asking the workers to checkpoint and stop" in err
    # No report from the worker: the wrapper exits with torchrun's own code, and says so.
    match = re.search(r"recall-dist torchrun: exit (\d+) \(no report from the workers.*torchrun exited (-?\d+)\)", err)
    assert match, err[-3000:]
    expected = int(match.group(2)) if int(match.group(2)) >= 0 else 128 - int(match.group(2))
    assert code == int(match.group(1)) == expected != 0
    assert not scratch.exists(), "the scratch directory was left behind"


def test_every_sigusr1_touches_the_given_stop_file_and_the_report_gives_the_code(tmp_path):
    stop = tmp_path / "not yet" / "STOP"  # its directory is created on the first signal
    proc, log = _launch(tmp_path, "sigusr1", **{STOP_FILE_ENV: str(stop), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "7"})
    _wait_for_line(proc, log, "ready")
    env = json.loads((tmp_path / "env.json").read_text())
    assert env[STOP_FILE_ENV] == str(stop) and env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "7"
    scratch = Path(env[OUTCOME_FILE_ENV]).parent
    assert scratch != stop.parent and scratch.is_dir()

    os.kill(proc.pid, signal.SIGUSR1)
    _wait_for_line(proc, log, "stop file")
    os.kill(proc.pid, signal.SIGUSR1)  # the second one too: SIGUSR1 is never passed on
    code, err = _finish(proc)
    assert log.read_text().splitlines() == ["ready", "stop file", "stop file again"]
    assert code == 3, err[-3000:]  # the report's code; torchrun exited 1
    assert "exit 3 (the workers report: diverged; torchrun exited 1)" in err
    assert err.count("SIGUSR1: asking the workers to checkpoint and stop") == 2
    assert not scratch.exists()
    assert stop.parent.is_dir()  # the caller's stop file is the caller's: not cleaned up with the scratch
