"""recall_dist/train/rundir/manifest.py: the manifest catches truncation, flipped bits, missing and
stray files (the same verdict when the hashing is split over 3 gloo ranks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.rundir.manifest import build_manifest, list_files, read_manifest, verify
from tests.train.rundir.helpers import flip_bit, make_checkpoints


def test_manifest_catches_truncation_flipped_bits_missing_and_stray_files(tmp_path):
    make_checkpoints(tmp_path, steps=(4,))
    root = tmp_path / "checkpoints" / "step_00000004"
    manifest = read_manifest(root)
    for name, size in list_files(root):  # an independent SHA-256 of every file
        assert manifest["files"][name] == {
            "size": size,
            "sha256": hashlib.sha256((root / name).read_bytes()).hexdigest(),
        }
    assert verify(root, manifest, "checksum") == []

    flip_bit(root / "engine" / "weights.bin")
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
            flip_bit(Path(root) / name, 0)
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
