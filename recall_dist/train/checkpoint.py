"""Atomic training checkpoints under ``<output_dir>/checkpoints/step_XXXXXXXX/``.

Layout of one checkpoint::

    engine/                   the backend's own state: model, optimizer, LR schedule
                              (DeepSpeed ``save_checkpoint`` or ``torch.distributed.checkpoint``)
    trainer_rank00000.pt ...  per rank: step, data position, RNG states, loss state (truncation buffer)
    config.yaml               the TrainConfig (what ``export_hf`` rebuilds the model from)
    COMPLETE                  written last

Atomicity: everything goes to ``.tmp-step_X`` first; files are fsynced, ``COMPLETE`` is written,
then the directory is renamed into place and the parent fsynced.  A crash at any point leaves the
previous complete checkpoints untouched, and ``latest_checkpoint`` never picks a partial one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (``<output_dir>/checkpoints``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def checkpoint_step(path: str | Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a step_XXXXXXXX checkpoint directory")
    return int(match.group(1))


class Checkpointer:
    """Saves and restores checkpoints of one run; every method is collective over the world."""

    def __init__(self, output_dir: str | Path, rank: int, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.rank, self.keep = rank, keep

    def save(self, engine, step: int, trainer_state: dict, config: dict) -> Path:
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.rank == 0:
            if tmp.exists():  # left by a crash mid-save
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save(str(tmp / "engine"))
        torch.save(trainer_state, tmp / f"trainer_rank{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            with open(tmp / "config.yaml", "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text(f"{step}\n")
            _fsync_tree(tmp)
            self._publish(tmp, final)
            self._prune()
        _barrier()
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again (e.g. preemption right after a periodic save)
            old = final.with_name(f".old-{final.name}")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)

    def _prune(self) -> None:
        done = sorted(
            (p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()),
            key=lambda p: p.name,
        )
        for path in done[: -self.keep]:
            shutil.rmtree(path)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: ``auto`` -> latest complete one (or None), ``none`` -> None,
        otherwise the given directory (which must be complete)."""
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(self.root)
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"train.resume = {resume!r}: not a complete checkpoint (no {COMPLETE} file)")
        return path

    def load(self, path: Path, engine) -> dict:
        """Restore the engine from ``path`` and return this rank's trainer state."""
        engine.load(str(path / "engine"))
        mine = path / f"trainer_rank{self.rank:05d}.pt"
        if not mine.is_file():  # a different world size: the data position and loss buffer are
            mine = path / "trainer_rank00000.pt"  # identical on every rank, take rank 0's
        return torch.load(mine, weights_only=False)
