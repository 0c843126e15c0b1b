"""Shared pieces of the checkpoint tests: a minimal engine, a run's checkpoints, a flipped bit."""

from __future__ import annotations

from pathlib import Path

import torch

from recall_dist.train.rundir.checkpointer import Checkpointer


class FileEngine:
    """The engine seam at its smallest: one weights file, saved and loaded back."""

    def __init__(self, payload: bytes = b"weights" * 1000):
        self.payload, self.loaded = payload, None

    def save(self, directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "weights.bin").write_bytes(self.payload)

    def load(self, directory: str) -> None:
        self.loaded = (Path(directory) / "weights.bin").read_bytes()


def make_checkpoints(tmp_path, steps=(4, 8), verify_mode="checksum") -> Checkpointer:
    ckpt = Checkpointer(tmp_path, rank=0, keep=3, verify=verify_mode)
    for step in steps:
        ckpt.save(FileEngine(bytes([step]) * 4096), step, {"step": step, "w": torch.arange(3.0)}, {"model": {}})
    return ckpt


def flip_bit(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
