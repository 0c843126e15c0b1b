"""The sweep's known-support task, built from its config: the prompts of a support file (``support``) or a
built-in synthetic task (``task``).  Outside ``eval/config.py``, so that the config tree reads no file: a
support file is read and checked here, by the code that runs the sweep (the CLI calls it before any rank
starts, so a bad file is a config error naming ``support``)."""

from __future__ import annotations

from pathlib import Path

from recall_dist.configtree import ConfigError
from recall_dist.data import build_task as build_builtin_task
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.support_file import SupportFile


def build_task(cfg: SweepConfig):
    """The known-support task of ``cfg``: its support file's prompts, or the built-in ``task``.  A support file
    that cannot be read or breaks a rule (README, "Temperature sweep") raises ``ConfigError`` naming ``support``."""
    if cfg.support is None:
        return build_builtin_task(cfg.task, **cfg.task_params)
    try:
        return SupportFile(Path(cfg.support).expanduser(), cfg.normalize_p)
    except ValueError as e:
        raise ConfigError("support", str(e)) from None
