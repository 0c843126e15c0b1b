"""What can go wrong with a run directory: ``RunDirError`` (refused to start, exit code 2) and the
checkpoint errors (a checkpoint cannot be written or read, exit code 1)."""

from __future__ import annotations

from recall_dist.configtree import ConfigError


class RunDirError(ConfigError):
    """The output directory cannot be used as asked (another run holds it, it holds another run, or
    the checkpoint is another experiment).  Nothing was changed; exit code 2 like a config error."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names it and says what to do."""


class CheckpointDiskFull(CheckpointError):
    """No space (or quota) left while saving; the earlier checkpoints are untouched."""


class UnsafeCheckpoint(CheckpointError):
    """A trainer-state file holds something other than plain data and tensors: refused, not executed."""
