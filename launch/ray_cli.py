"""Command-line handling shared by the Ray entry points: ``CONFIG.yaml [key=value ...]`` where
``ray.*`` keys configure the Ray layout and the rest override the config; relative output paths go
under ``$RECALL_DIST_OUTPUT_ROOT`` (a Ray job runs in a temporary copy of the working dir)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from recall_dist.configtree import apply_overrides, from_dict

T = TypeVar("T")


def split_args(argv: list[str], ray_config_cls: type[T], usage: str) -> tuple[str, list[str], T]:
    """-> (config path, config overrides, the validated ``ray.*`` dataclass)."""
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        raise SystemExit(usage)
    config, overrides = argv[0], argv[1:]
    ray_overrides = [o[len("ray.") :] for o in overrides if o.startswith("ray.")]
    ray_cfg = from_dict(ray_config_cls, apply_overrides({}, ray_overrides), "ray")
    return config, [o for o in overrides if not o.startswith("ray.")], ray_cfg


def under_output_root(path: str) -> str:
    """``path`` made absolute: relative paths are placed under ``$RECALL_DIST_OUTPUT_ROOT`` (~/recall_dist)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(os.environ.get("RECALL_DIST_OUTPUT_ROOT", "~/recall_dist")).expanduser() / p
    return str(p.resolve())
