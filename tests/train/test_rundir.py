"""recall_dist/train/rundir.py and fingerprint.py on their own (no training): the output_dir lock and
its stale cases, the rules for a used output_dir (move aside, never delete), and the experiment
fingerprint.  Training runs through them in tests/train/test_nothing_lost.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recall_dist.configtree import to_dict
from recall_dist.train.fingerprint import config_fingerprint, fingerprint_differences
from recall_dist.train.rundir import (
    LOCK_NAME,
    PREVIOUS_RUNS,
    STALE_AFTER_S,
    OutputDirLock,
    RunDirError,
    check_same_experiment,
    prepare_output_dir,
    run_files,
)
from tests.train.helpers import build, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def _hold_lock_in_subprocess(out: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from recall_dist.train.rundir import OutputDirLock; "
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
    import recall_dist.train.rundir as rundir

    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = OutputDirLock(tmp_path).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


def _fill(out: Path, steps=(4, 8)) -> None:
    for step in steps:
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "COMPLETE").write_text(f"{step}\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_bytes(b"weights")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_resume_none_into_a_used_dir_is_refused_and_overwrite_moves_it_aside(tmp_path):
    out = tmp_path / "run"
    _fill(out)
    (out / "STOP").touch()  # not ours (Slurm's): neither counted nor moved
    before = _snapshot(out)
    with pytest.raises(RunDirError, match=r"already holds a run: checkpoints, metrics.jsonl, final .*step 8"):
        prepare_output_dir(out, "none", overwrite=False, newest_step=8, resume_step=None)
    assert _snapshot(out) == before
    resume, note = prepare_output_dir(out, "none", overwrite=True, newest_step=8, resume_step=None)
    assert resume == "none" and "moved to" in note
    (moved,) = (out / PREVIOUS_RUNS).iterdir()
    assert {k: v for k, v in _snapshot(moved).items() if k != "MOVED_HERE"} == {
        k: v for k, v in before.items() if k != "STOP"
    }
    assert run_files(out) == [] and (out / "STOP").exists()


def test_auto_continues_and_an_explicit_older_checkpoint_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    _fill(out)
    assert prepare_output_dir(out, "auto", False, 8, None) == ("auto", None)
    newest = str(out / "checkpoints" / "step_00000008")
    assert prepare_output_dir(out, newest, False, 8, 8) == (newest, None)
    older = str(out / "checkpoints" / "step_00000004")
    with pytest.raises(RunDirError, match=r"start from .*step_00000004"):
        prepare_output_dir(out, older, False, 8, 4)
    resume, _ = prepare_output_dir(out, older, True, 8, 4)  # the checkpoint moves with the old run
    assert Path(resume).parents[2].name == PREVIOUS_RUNS
    assert (Path(resume) / "COMPLETE").read_text() == "4\n"


def test_auto_without_a_complete_checkpoint_starts_over_keeping_the_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "checkpoints" / ".tmp-step_00000004").mkdir(parents=True)
    resume, note = prepare_output_dir(out, "auto", False, None, None)
    assert resume == "auto" and "starting over" in note
    (moved,) = (out / PREVIOUS_RUNS).iterdir()
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_fingerprint_names_the_keys_that_change_the_experiment(tmp_path):
    base = build(tiny_config_dict(tmp_path))
    changed = build(
        tiny_config_dict(
            tmp_path / "other",
            loss={"name": "cdiv", "params": {"alpha": 2.0}, "chunk_size": 64},
            optim={"lr": 1e-3},
            train={"max_steps": 99, "log_every": 3},
        )
    )
    a, b = config_fingerprint(to_dict(base)), config_fingerprint(to_dict(changed))
    assert a["sha256"] != b["sha256"]
    # The run length, logging, output dir and the chunk size (a memory knob) do not change the experiment.
    assert fingerprint_differences(a, b) == ["loss.params.alpha: 1.4 -> 2.0", "optim.lr: 0.003 -> 0.001"]
    assert fingerprint_differences(a, json.loads(json.dumps(a))) == []
    with pytest.raises(RunDirError, match=r"(?s)different experiment.*loss.params.alpha: 1.4 -> 2.0.*optim.lr"):
        check_same_experiment(a, b, tmp_path / "step_00000004", allow_change=False)
    assert len(check_same_experiment(a, b, tmp_path, allow_change=True)) == 2


def test_an_unreadable_fresh_lock_is_respected_and_an_old_one_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")  # another starter between create and write
    with pytest.raises(RunDirError, match="a lock file being written or unreadable"):
        OutputDirLock(tmp_path).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    OutputDirLock(tmp_path).acquire().release()
