"""recall_dist/train/rundir/checkpointer.py: a damaged newest checkpoint is set aside for the previous
one (a missing manifest is damage like any other), every one damaged stops the run, and a planted pickle
payload in the trainer state is refused, not run (a full disk: tests/test_io.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recall_dist.configtree import ConfigError
from recall_dist.train.rundir.checkpointer import complete_checkpoints
from recall_dist.train.rundir.errors import CheckpointError, UnsafeCheckpoint
from recall_dist.train.rundir.manifest import build_manifest, write_manifest
from tests.train.rundir.helpers import FileEngine, flip_bit, make_checkpoints


def test_a_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, capsys):
    ckpt = make_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000008"
    flip_bit(newest / "engine" / "weights.bin")
    assert ckpt.select("auto") == tmp_path / "checkpoints" / "step_00000004"
    assert "checkpoint" in capsys.readouterr().err
    assert not newest.exists() and (newest.parent / "step_00000008.damaged").is_dir()  # kept, never picked
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]
    engine = FileEngine()
    assert ckpt.load(ckpt.select("auto"), engine)["step"] == 4 and engine.loaded == bytes([4]) * 4096

    with pytest.raises(CheckpointError, match=r"(?s)is damaged.*weights.bin: SHA-256"):
        ckpt.select(str(newest.parent / "step_00000008.damaged"))  # not COMPLETE-named, still checked
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.select(str(tmp_path))
    (tmp_path / "checkpoints" / "step_00000004" / "MANIFEST.json").unlink()  # damaged like any other
    with pytest.raises(CheckpointError, match=r"(?s)is damaged.*MANIFEST\.json: missing"):
        ckpt.select(str(tmp_path / "checkpoints" / "step_00000004"))
    with pytest.raises(CheckpointError, match=r"every checkpoint under .* is damaged"):
        ckpt.select("auto")
    assert "MANIFEST.json: missing" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_00000004.damaged").is_dir()


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    ckpt = make_checkpoints(tmp_path, verify_mode="size")
    for step in (4, 8):
        with open(tmp_path / "checkpoints" / f"step_{step:08d}" / "engine" / "weights.bin", "ab") as f:
            f.write(b"!")
    with pytest.raises(CheckpointError, match=r"every checkpoint under .* is damaged"):
        ckpt.select("auto")


class Payload:
    """What an attacker plants: unpickling it calls ``Path.write_text`` (any callable would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "payload ran")


def test_a_planted_pickle_payload_is_refused_not_executed(tmp_path):
    ckpt = make_checkpoints(tmp_path, steps=(4,))
    root = tmp_path / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    torch.save({"w": Payload(marker)}, root / "trainer_rank00000.tensors.pt")
    write_manifest(root, build_manifest(root, checksum=True))  # the attacker also fixes the manifest
    assert ckpt.select("auto") == root
    engine = FileEngine()
    with pytest.raises(UnsafeCheckpoint, match="refused: it holds pickled objects other than tensors"):
        ckpt.load(root, engine)
    assert not marker.exists(), "the payload ran"
    assert engine.loaded is None, "the engine was touched before the state was checked"
    torch.load(root / "trainer_rank00000.tensors.pt", weights_only=False)  # what the old loader did
    assert marker.read_text() == "payload ran"
