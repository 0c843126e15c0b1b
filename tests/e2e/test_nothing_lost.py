"""Nothing lost, whatever the user does (tiny CPU config, real DeepSpeed / FSDP2 runs):

- ``resume=none`` into a used output_dir is refused with nothing touched; ``overwrite`` moves the old
  run aside, and ``resume=auto`` then continues the new run, not the old one's newest checkpoint;
- ``resume=auto`` with a different experiment (loss.params.alpha, optim.lr) is refused, listing them;
- a second run on the same output_dir is refused (exit 2, naming the holder): metrics are not interleaved;
- a damaged newest checkpoint (a flipped bit in a .distcp file, a truncated ZeRO shard) is set aside and
  the run resumes from the previous one, reproducing the same losses;
- a full disk under DeepSpeed says so (exit 1) and keeps the earlier checkpoint intact;
- a diverging run (lr 1e30) logs NaN, never 0.0, and stops with exit code 3 and no export, on both backends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.metrics_log import read_metrics
from recall_dist.train.rundir import LOCK_NAME, PREVIOUS_RUNS, RunDirError, complete_checkpoints
from tests.train.helpers import build, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _config(out: Path, backend: str = "fsdp2", **train) -> dict:
    return tiny_config_dict(
        out, backend={"name": backend}, train={"max_steps": 4, "checkpoint_every": 2, "export_final": True, **train}
    )


def _with(data: dict, section: str, **values) -> dict:
    data = json.loads(json.dumps(data))
    data[section].update(values)
    return data


def _used_dir_worker(out: str) -> None:
    from recall_dist.train.trainer import run_training

    out = Path(out)
    first = _config(out)
    run_training(build(first))
    before = _files(out)
    with pytest.raises(RunDirError, match=r"already holds a run: checkpoints, metrics.jsonl, final"):
        run_training(build(_with(first, "train", resume="none")))
    other = _with(_with(_with(first, "loss", params={"alpha": 2.0}), "optim", lr=1e-3), "train", max_steps=6)
    with pytest.raises(RunDirError, match=r"(?s)different experiment.*loss.params.alpha: 1.4 -> 2.0.*optim.lr"):
        run_training(build(other))
    assert _files(out) == before, "a refused run changed the output_dir"

    assert run_training(build(_with(other, "train", allow_config_change=True)))["step"] == 6  # continued 4 -> 6
    old_run = _files(out)
    fresh = _with(first, "train", resume="none", overwrite=True, max_steps=2, export_final=False)
    run_training(build(fresh))
    (moved,) = (out / PREVIOUS_RUNS).iterdir()
    kept = _files(moved)
    assert {k: v for k, v in kept.items() if k != "MOVED_HERE"} == old_run, "the old run was not kept whole"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000002"]
    summary = run_training(build(_with(fresh, "train", resume="auto", max_steps=3)))
    assert summary["step"] == 3 and [r["step"] for r in read_metrics(out)] == [1, 2, 3], "resumed the wrong run"


@pytest.mark.slow
def test_a_used_output_dir_is_never_overwritten_or_silently_continued(tmp_path):
    run_distributed_test(_used_dir_worker, 1, str(tmp_path / "run"))


def _damage_distcp(step_dir: Path) -> None:
    shard = max(step_dir.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the middle of the model/optimizer tensors
    shard.write_bytes(bytes(data))


def _truncate_zero_shard(step_dir: Path) -> None:
    (shard,) = step_dir.rglob("*optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def _damaged_worker(out: str, backend: str) -> None:
    from recall_dist.train.trainer import run_training

    out = Path(out)
    data = _config(out, backend, export_final=False)
    run_training(build(data))
    expected = {r["step"]: r["loss"] for r in read_metrics(out)}
    newest = out / "checkpoints" / "step_00000004"
    (_damage_distcp if backend == "fsdp2" else _truncate_zero_shard)(newest)
    assert run_training(build(data))["step"] == 4
    assert (out / "checkpoints" / "step_00000004.damaged").is_dir(), "the damaged checkpoint was not kept aside"
    assert {r["step"]: r["loss"] for r in read_metrics(out)} == expected  # steps 3-4 re-run from step 2


@pytest.mark.slow
@pytest.mark.parametrize("backend,damage", [("fsdp2", "flipped bit"), ("deepspeed", "truncated shard")])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, backend, damage, capfd):
    run_distributed_test(_damaged_worker, 1, str(tmp_path / "run"), backend)
    err = capfd.readouterr().err
    assert "WARNING: checkpoint" in err and "is damaged" in err
    assert "resumed from" in err and "step_00000002 at step 2" in err


def _train_cli(config: dict, tmp_path: Path, *overrides: str, prefix=(), **popen) -> subprocess.Popen:
    path = tmp_path / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    cmd = [*prefix, sys.executable, "-m", "recall_dist", "train", str(path), *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    data = tiny_config_dict(out, data={"num_samples": 50_000}, train={"max_steps": 5000})
    first = _train_cli(data, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        holder = json.loads((out / LOCK_NAME).read_text())
        second = _train_cli(data, tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert f"{out} is in use by another run (host {holder['host']}, pid {first.pid}" in err
        first.send_signal(signal.SIGTERM)  # stop the first run cleanly: checkpoint, PREEMPTED, exit 0
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    stopped_at = int((out / "PREEMPTED").read_text())
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped_at + 1)), "interleaved metrics"
    assert not (out / LOCK_NAME).exists()


def _namespace_prefix() -> list[str]:
    """A private mount namespace where a small tmpfs can be mounted (as root, or in a user namespace)."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if (
            shutil.which("unshare")
            and subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0
        ):
            return prefix
    pytest.skip("cannot create a mount namespace here (no unshare, no user namespaces, not root)")


@pytest.mark.slow
def test_disk_full_under_deepspeed_says_so_and_keeps_the_earlier_checkpoint(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    # Step 2's checkpoint (~420 KiB) fits in 640 KiB; step 4's does not.
    data = tiny_config_dict(out / "run", train={"max_steps": 4, "checkpoint_every": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    script = (
        f"mount -t tmpfs -o size=640k tmpfs {out} && "
        f"{sys.executable} -m recall_dist train {path}; echo rc=$? ; "
        f"{sys.executable} -c 'from recall_dist.train.rundir import Checkpointer as C; "
        f'print("selected", C("{out / "run"}", 0).select("auto"))\''
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [*_namespace_prefix(), "sh", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "recall-dist train: error: disk full: no space left on the file system of" in proc.stderr, proc.stderr
    assert "while saving the checkpoint of step 4" in proc.stderr
    assert "The earlier checkpoints are intact: step_00000002." in proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"selected {out / 'run' / 'checkpoints' / 'step_00000002'}" in proc.stdout  # it verifies


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "fsdp2"])
def test_divergence_logs_nan_stops_with_exit_3_and_exports_nothing(tmp_path, backend):
    out = tmp_path / "run"
    data = tiny_config_dict(out, backend={"name": backend}, optim={"lr": 1e30}, train={"export_final": True})
    proc = _train_cli(data, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "training diverged: steps" in err and "3 in a row" in err
    records = read_metrics(out)
    bad = [r for r in records if r["skipped"]]
    assert len(bad) == 3 and records[-1]["step"] < 12, [(r["step"], r["loss"]) for r in records]
    assert all(math.isnan(r["loss"]) or not math.isfinite(r.get("grad_norm", 0.0)) for r in bad)
    assert not any(r["loss"] == 0.0 or r["nll"] == 0.0 for r in records), "a skipped step was logged as 0.0"
    assert not (out / "final").exists() and (out / "DIVERGED").is_file()
