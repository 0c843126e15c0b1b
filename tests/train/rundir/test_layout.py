"""recall_dist/train/rundir/layout.py on its own (no training): the rules for a used output_dir (move
aside, never delete).  Training runs through them in tests/e2e/test_nothing_lost.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from recall_dist.train.rundir.errors import RunDirError
from recall_dist.train.rundir.layout import PREVIOUS_RUNS, prepare_output_dir, run_files


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


@pytest.mark.parametrize("resume", ["auto", "none", "checkpoints/step_00000008"])
def test_a_finished_run_without_a_final_checkpoint_is_never_continued(tmp_path, resume):
    """``train.final_checkpoint: false``: its final/ is newer than its newest checkpoint.  Any start is
    refused with nothing touched (continuing step 8 would re-train and replace final/); with overwrite
    the whole run, final/ included, is moved aside and the new one starts over."""
    from recall_dist.train.rundir.layout import NO_FINAL_CHECKPOINT, mark_no_final_checkpoint

    out = tmp_path / "run"
    _fill(out)
    mark_no_final_checkpoint(out, {"step": 10, "latest_checkpoint": str(out / "checkpoints" / "step_00000008")})
    assert NO_FINAL_CHECKPOINT in run_files(out)
    resume = resume if "/" not in resume else str(out / resume)
    before = _snapshot(out)
    with pytest.raises(RunDirError, match=r"finished run without a checkpoint of its last step.*train.overwrite"):
        prepare_output_dir(out, resume, overwrite=False, newest_step=8, resume_step=8)
    assert _snapshot(out) == before
    new_resume, note = prepare_output_dir(out, resume, overwrite=True, newest_step=8, resume_step=8)
    (moved,) = (out / PREVIOUS_RUNS).iterdir()
    assert {k: v for k, v in _snapshot(moved).items() if k != "MOVED_HERE"} == before and "moved to" in note
    assert new_resume == "none" or new_resume.startswith(str(moved))  # a given checkpoint is followed
    assert run_files(out) == []
