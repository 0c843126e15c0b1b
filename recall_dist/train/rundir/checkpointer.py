"""Atomic, verified training checkpoints under ``<output_dir>/checkpoints/step_XXXXXXXX/``: ``Checkpointer``
(save, select the one to resume, load), and finding the complete ones (``latest_checkpoint``).

Layout of one checkpoint::

    engine/                         the backend's own state: model, optimizer, LR schedule
                                    (DeepSpeed ``save_checkpoint`` or ``torch.distributed.checkpoint``)
    trainer_rank00000.json          per rank, plain data: step, data position, RNG states, loss state ...
    trainer_rank00000.tensors.pt    ... and its tensors (truncation buffer, RNG states), read back with
                                    ``torch.load(weights_only=True)``: loading never runs code from the file
                                    (``state.py``)
    config.yaml                     the TrainConfig (what ``export_hf`` rebuilds the model from)
    fingerprint.json                the experiment's keys (model, loss, optim, data; ``experiment.py``)
    MANIFEST.json                   every file above: size and SHA-256 (``manifest.py``), written after them
    COMPLETE                        written last

Atomicity: everything goes to ``.tmp-step_X`` first; files are fsynced, the manifest and ``COMPLETE``
are written, then the directory is renamed into place and the parent fsynced.  A crash (or a full disk)
at any point leaves the previous complete checkpoints untouched, and a partial one is never picked.
Before a resume the manifest is checked; a damaged checkpoint (a file missing, truncated or changed, or
no manifest at all) is renamed ``step_X.damaged`` and the previous complete one is used
(``Checkpointer.select``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist
import yaml

from recall_dist.configtree import ConfigError
from recall_dist.distributed.ranks import broadcast_from_rank0, world_group
from recall_dist.io import format_bytes, fresh_dir, fsync_tree, is_disk_full, publish_dir, temp_sibling
from recall_dist.log import get_logger
from recall_dist.train.rundir.errors import CheckpointDiskFull, CheckpointError
from recall_dist.train.rundir.experiment import FINGERPRINT, config_fingerprint
from recall_dist.train.rundir.layout import CHECKPOINTS
from recall_dist.train.rundir.manifest import MANIFEST, build_manifest, read_manifest, verify, write_manifest
from recall_dist.train.rundir.state import read_trainer_state, write_trainer_state

log = get_logger("train")
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if world_group() is not None:
        dist.barrier()


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under ``root`` (``<output_dir>/checkpoints``), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (``<output_dir>/checkpoints``)."""
    done = complete_checkpoints(root)
    return done[0] if done else None


def checkpoint_step(path: str | Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a step_XXXXXXXX checkpoint directory")
    return int(match.group(1))


class Checkpointer:
    """Saves and restores checkpoints of one run; every method is collective over the world.
    ``verify``: ``checksum`` | ``size`` | ``none`` (``train.verify_checkpoints``, see ``manifest.py``)."""

    def __init__(self, output_dir: str | Path, rank: int, keep: int = 2, verify: str = "checksum"):
        self.root = Path(output_dir) / CHECKPOINTS
        self.rank, self.keep, self.verify = rank, keep, verify

    def save(self, engine, step: int, trainer_state: dict, config: dict) -> Path:
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = temp_sibling(final)
        if self.rank == 0:
            fresh_dir(tmp)  # a crash mid-save may have left one
        _barrier()
        try:
            engine.save(str(tmp / "engine"))
            write_trainer_state(tmp, self.rank, trainer_state)
            _barrier()
            if self.rank == 0:
                with open(tmp / "config.yaml", "w") as f:
                    yaml.safe_dump(config, f, sort_keys=False)
                (tmp / FINGERPRINT).write_text(json.dumps(config_fingerprint(config), indent=1))
            _barrier()
            manifest = build_manifest(tmp, checksum=self.verify == "checksum")  # also fsyncs every file
            if self.rank == 0:
                write_manifest(tmp, manifest)
                with open(tmp / COMPLETE, "w") as f:
                    f.write(f"{step}\n")
                    f.flush()
                    os.fsync(f.fileno())
                # The directory entries too, before the rename (build_manifest fsynced the files).
                fsync_tree(tmp, files=False, directories=True)
                # The same step saved again (e.g. preemption right after a periodic save) replaces it.
                publish_dir(tmp, final)
                self._prune()
        except BaseException as e:
            if is_disk_full(e, self.root):
                raise self._disk_full(step, tmp) from e
            raise
        _barrier()
        return final

    def _disk_full(self, step: int, tmp: Path) -> CheckpointDiskFull:
        usage = shutil.disk_usage(self.root) if self.root.exists() else None
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint: give the space back
        kept = [p.name for p in complete_checkpoints(self.root)]
        space = f" ({format_bytes(usage.free)} free of {format_bytes(usage.total)})" if usage else ""
        earlier = f"The earlier checkpoints are intact: {', '.join(kept)}." if kept else "No earlier checkpoint."
        return CheckpointDiskFull(
            f"disk full: no space left on the file system of {self.root}{space} while saving the checkpoint "
            f"of step {step} (the partial {tmp.name} was removed). {earlier} Free space (or lower "
            f"train.keep_checkpoints, or move train.output_dir) and run again with train.resume=auto."
        )

    def _prune(self) -> None:
        for path in complete_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(path)

    def _problems(self, path: Path) -> list[str]:
        manifest = broadcast_from_rank0(read_manifest(path) if self.rank == 0 else None, world_group())
        if manifest is None:  # written before COMPLETE: a checkpoint without one is damaged like any other
            return [f"{MANIFEST}: missing"]
        return verify(path, manifest, self.verify)

    def select(self, resume: str) -> Path | None:
        """The checkpoint to resume from, verified against its manifest: ``none`` -> None; a directory ->
        it (``CheckpointError`` if damaged); ``auto`` -> the newest complete one that verifies.  A
        damaged newest one is renamed ``<name>.damaged`` (kept, never picked again) with a warning,
        and the previous one is tried."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise ConfigError("train.resume", f"{resume!r} is not a complete checkpoint (no {COMPLETE} file)")
            problems = self._problems(path)
            if problems:
                raise CheckpointError(f"train.resume = {resume!r} is damaged:\n  " + "\n  ".join(problems))
            return path
        candidates = broadcast_from_rank0(complete_checkpoints(self.root) if self.rank == 0 else None, world_group())
        for path in candidates:
            problems = self._problems(path)
            if not problems:
                return path
            if self.rank == 0:
                aside = self._set_aside(path)
                log.warning(
                    "checkpoint %s is damaged, renamed %s; trying the previous one:\n  %s",
                    path,
                    aside.name,
                    "\n  ".join(problems[:10]),
                )
            _barrier()
        if candidates:
            raise CheckpointError(
                f"every checkpoint under {self.root} is damaged (renamed *.damaged; see the warnings above); "
                f"nothing to resume.  Start over with train.resume=none train.overwrite=true."
            )
        return None

    @staticmethod
    def _set_aside(path: Path) -> Path:
        aside, n = path.with_name(f"{path.name}.damaged"), 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.damaged-{n}"), n + 1
        os.rename(path, aside)
        return aside

    def load(self, path: Path, engine) -> dict:
        """Restore the engine from ``path`` and return this rank's trainer state (read first: a
        refused state file stops before the engine is touched)."""
        state = read_trainer_state(path, self.rank)
        engine.load(str(path / "engine"))
        return state
