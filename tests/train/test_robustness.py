"""Robustness: the stop file preempts a run inside an existing process group (as under Ray Train),
a non-finite step skips the optimizer update on both backends, and a crash mid-save never
corrupts the last complete checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recall_dist.configtree import ConfigError
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.metrics_log import read_metrics
from recall_dist.train.rundir import COMPLETE, Checkpointer, latest_checkpoint
from tests.train.helpers import build, tiny_config_dict


def _preempted_worker(data: dict, stop_file: str) -> None:
    import os

    import torch.distributed as dist

    from recall_dist.train.trainer import run_training

    os.environ["RECALL_DIST_STOP_FILE"] = stop_file
    if dist.get_rank() == 1:  # created by one rank, seen by all; the flag is all-reduced (MAX)
        Path(stop_file).touch()
    dist.barrier()
    summary = run_training(build(data))
    assert summary["preempted"] and summary["step"] == 1, summary
    assert dist.is_initialized()  # a group we did not create is left alone


@pytest.mark.slow
def test_stop_file_inside_existing_group_checkpoints_and_marks_preempted(tmp_path):
    out = tmp_path / "run"
    data = tiny_config_dict(out, backend={"name": "fsdp2"}, train={"gradient_checkpointing": True})
    run_distributed_test(_preempted_worker, 2, data, str(tmp_path / "stop"))
    assert (out / "PREEMPTED").read_text() == "1\n"
    assert latest_checkpoint(out / "checkpoints").name == "step_00000001"
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / "final").exists()


def _optimizer_state(engine) -> dict:
    optimizer = engine.optimizer if hasattr(engine, "optimizer") else None
    if hasattr(engine, "ds"):
        optimizer = engine.ds.optimizer.optimizer
    return optimizer.state


def _nonfinite_worker(data: dict) -> None:
    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    batches = endless(run.batches)
    weight = run.engine.module.model.model.norm.weight
    with torch.no_grad():
        saved = weight.detach().clone()
        weight.fill_(float("nan"))
    stats = train_step(run, batches)
    assert stats["skipped"] == 1.0 and stats["nonfinite_tokens"] > 0, stats
    assert len(_optimizer_state(run.engine)) == 0, "the optimizer stepped on a non-finite step"
    with torch.no_grad():
        weight.copy_(saved)
    stats = train_step(run, batches)
    assert stats["skipped"] == 0.0 and math.isfinite(stats["loss"]), stats
    assert len(_optimizer_state(run.engine)) > 0


@pytest.mark.parametrize("backend", [{"name": "deepspeed", "zero_stage": 2}, {"name": "fsdp2"}], ids=["zero2", "fsdp2"])
def test_nonfinite_step_skips_the_update(tmp_path, backend):
    run_distributed_test(_nonfinite_worker, 1, tiny_config_dict(tmp_path, backend=backend))


class _FileEngine:
    """The engine seam at its smallest: ``save`` writes a file, or dies half-way when told to."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights.bin").write_bytes(b"partial" if self.crash else b"complete")
        if self.crash:
            raise KeyboardInterrupt("killed mid-save")


def test_crash_mid_save_keeps_the_last_complete_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, rank=0, keep=2)
    first = ckpt.save(_FileEngine(), 4, {"step": 4}, {"model": {}})
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(_FileEngine(crash=True), 8, {"step": 8}, {"model": {}})
    assert latest_checkpoint(tmp_path / "checkpoints") == first
    assert ckpt.select("auto") == first and ckpt.select("none") is None
    assert (tmp_path / "checkpoints" / ".tmp-step_00000008").is_dir()  # the debris is ignored...
    ckpt.save(_FileEngine(), 8, {"step": 8}, {"model": {}})  # ...and replaced by the next save
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000008").exists()
    ckpt.save(_FileEngine(), 12, {"step": 12}, {"model": {}})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000008", "step_00000012"]  # keep=2 pruned step 4
    assert (tmp_path / "checkpoints" / "step_00000012" / COMPLETE).read_text() == "12\n"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.select(str(tmp_path / "checkpoints" / ".tmp-step_00000008"))
