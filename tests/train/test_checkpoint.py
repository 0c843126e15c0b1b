"""recall_dist/train/checkpoint.py and manifest.py: the manifest catches truncation, flipped bits, missing
and stray files (the same verdict when the hashing is split over 3 gloo ranks); a damaged newest
checkpoint is set aside for the previous one; the trainer state is plain JSON + tensors and a planted
pickle payload is refused, not run (a full disk: tests/test_io.py)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from recall_dist.configtree import ConfigError
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    UnsafeCheckpoint,
    complete_checkpoints,
    read_trainer_state,
    rng_state,
    set_rng_state,
    write_trainer_state,
)
from recall_dist.train.manifest import build_manifest, list_files, read_manifest, verify, write_manifest


class FileEngine:
    """The engine seam at its smallest: one weights file, saved and loaded back."""

    def __init__(self, payload: bytes = b"weights" * 1000):
        self.payload, self.loaded = payload, None

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights.bin").write_bytes(self.payload)

    def load(self, directory: str) -> None:
        self.loaded = (Path(directory) / "weights.bin").read_bytes()


def _checkpoints(tmp_path, steps=(4, 8), verify_mode="checksum") -> Checkpointer:
    ckpt = Checkpointer(tmp_path, rank=0, keep=3, verify=verify_mode)
    for step in steps:
        ckpt.save(FileEngine(bytes([step]) * 4096), step, {"step": step, "w": torch.arange(3.0)}, {"model": {}})
    return ckpt


def _flip_bit(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_catches_truncation_flipped_bits_missing_and_stray_files(tmp_path):
    _checkpoints(tmp_path, steps=(4,))
    root = tmp_path / "checkpoints" / "step_00000004"
    manifest = read_manifest(root)
    for name, size in list_files(root):  # an independent SHA-256 of every file
        assert manifest["files"][name] == {
            "size": size,
            "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest(),
        }
    assert verify(root, manifest, "checksum") == []

    _flip_bit(root / "engine" / "weights.bin")
    assert verify(root, manifest, "size") == [], "size mode cannot see a flipped bit"
    (problem,) = verify(root, manifest, "checksum")
    assert problem.startswith("engine/weights.bin: SHA-256")

    with open(root / "engine" / "weights.bin", "r+b") as f:
        f.truncate(1000)
    (root / "engine" / "stray.bin").write_bytes(b"x")
    (root / "config.yaml").unlink()
    problems = verify(root, manifest, "size")
    assert "engine/weights.bin: 1000 bytes, the manifest says 4096" in problems
    assert "config.yaml: missing" in problems and "engine/stray.bin: not in the manifest" in problems
    assert verify(root, manifest, "none") == []


def _manifest_worker(root: str) -> None:
    import torch.distributed as dist

    manifest = build_manifest(root, checksum=True)
    assert verify(root, manifest, "checksum") == []
    nonempty = [name for name, e in sorted(manifest["files"].items()) if e["size"] > 0]
    if dist.get_rank() == 2:  # damaged by one rank, found in every rank's share, reported to all
        for name in nonempty:
            _flip_bit(Path(root) / name, 0)
    dist.barrier()
    problems = verify(root, manifest, "checksum")
    assert [p.split(":")[0] for p in problems] == nonempty, problems
    if dist.get_rank() == 0:
        Path(root, "gathered.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_manifest_split_over_three_ranks_equals_the_single_process_one(tmp_path):
    root = tmp_path / "ckpt"
    rng = np.random.default_rng(0)
    for i, size in enumerate([5, 70_000, 1 << 20, 3, 12_345, 0, 999]):  # uneven: the split balances bytes
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}").write_bytes(rng.bytes(size))
    expected = build_manifest(root, checksum=True)
    run_distributed_test(_manifest_worker, 3, str(root))
    assert json.loads((root / "gathered.json").read_text()) == expected


def test_a_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, capsys):
    ckpt = _checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_00000008"
    _flip_bit(newest / "engine" / "weights.bin")
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
    (tmp_path / "checkpoints" / "step_00000004" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"no MANIFEST\.json: written by an older recall_dist"):
        ckpt.select("auto")


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    ckpt = _checkpoints(tmp_path, verify_mode="size")
    for step in (4, 8):
        with open(tmp_path / "checkpoints" / f"step_{step:08d}" / "engine" / "weights.bin", "ab") as f:
            f.write(b"!")
    with pytest.raises(CheckpointError, match=r"every checkpoint under .* is damaged"):
        ckpt.select("auto")


def test_trainer_state_is_plain_json_and_tensors_and_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"step": 7, "rng": rng_state(), "loss": {"rule": "truncr", "state": {"tau": None, "v": torch.ones(3)}}}
    write_trainer_state(tmp_path, 0, state)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    plain = json.loads((tmp_path / "trainer_rank00000.json").read_text())  # JSON: no code can hide in it
    assert plain["loss"]["state"]["v"] == {"__tensor__": "loss.state.v"} and plain["step"] == 7
    back = read_trainer_state(tmp_path, 3)  # a rank the checkpoint does not have: rank 0's state
    torch.testing.assert_close(back["loss"]["state"]["v"], torch.ones(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(2), expected[2], rtol=0, atol=0)


class Payload:
    """What an attacker plants: unpickling it calls ``Path.write_text`` (any callable would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "payload ran")


def test_a_planted_pickle_payload_is_refused_not_executed(tmp_path):
    ckpt = _checkpoints(tmp_path, steps=(4,))
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


def test_a_pickled_state_from_an_older_version_is_refused(tmp_path):
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "trainer_rank00000.pt")
    with pytest.raises(UnsafeCheckpoint, match="older recall_dist as a pickle"):
        read_trainer_state(tmp_path, 0)
