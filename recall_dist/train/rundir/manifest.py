"""Checkpoint manifests (``MANIFEST.json``): each file's size and SHA-256, written after every other file
of the checkpoint, and checked before a checkpoint is loaded (a truncated shard, a flipped bit, a missing
or stray file).

Both the hashing at save time and the check at load time are split over the ranks (each file once, the
largest first to the least-loaded rank), with a few threads per rank (``hashlib`` releases the GIL), so
the cost is one read of the checkpoint spread over the job.  Modes (``train.verify_checkpoints``):
``checksum`` (sizes and SHA-256), ``size`` (sizes and the file list only: a ``stat`` per file, catches
truncation and missing files, not flipped bits), ``none`` (sizes written, nothing checked).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from recall_dist.distributed.collectives import group_rank, group_size
from recall_dist.distributed.ranks import broadcast_from_rank0, world_group
from recall_dist.io import atomic_write_json, fsync_file

MANIFEST = "MANIFEST.json"
_NOT_LISTED = (MANIFEST, "COMPLETE")
_CHUNK = 8 << 20
_THREADS = 4


def _world() -> tuple[int, int]:
    group = world_group()
    return group_rank(group), group_size(group)


def list_files(root: str | Path) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every file under ``root`` but the manifest and COMPLETE, sorted."""
    root = Path(root)
    files = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in _NOT_LISTED:
                files.append((rel, path.stat().st_size))
    return sorted(files)


def sha256_file(path: str | Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _my_share(files: list[tuple[str, int]], rank: int, world: int) -> list[str]:
    """This rank's files: largest first to the least-loaded rank (the same split on every rank)."""
    load = [0] * world
    mine = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += size + 1
        if owner == rank:
            mine.append(name)
    return mine


def _gather(part: dict) -> dict:
    if _world()[1] == 1:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def build_manifest(root: str | Path, checksum: bool) -> dict:
    """Collective: fsync every file under ``root`` and (``checksum``) hash it, each rank its share;
    returns the manifest on every rank."""
    root = Path(root)
    rank, world = _world()
    files = broadcast_from_rank0(list_files(root) if rank == 0 else None, world_group())

    def one(name: str) -> tuple[str, str | None]:
        if checksum:
            return name, sha256_file(root / name, fsync=True)
        fsync_file(root / name)
        return name, None

    with ThreadPoolExecutor(_THREADS) as pool:
        digests = _gather(dict(pool.map(one, _my_share(files, rank, world))))
    entries = {name: {"size": size, "sha256": digests[name]} for name, size in files}
    if not checksum:
        entries = {name: {"size": e["size"]} for name, e in entries.items()}
    return {"format": 1, "algorithm": "sha256" if checksum else None, "files": entries}


def write_manifest(root: str | Path, manifest: dict) -> None:
    atomic_write_json(Path(root) / MANIFEST, manifest, indent=1, sort_keys=True)


def read_manifest(root: str | Path) -> dict | None:
    """The manifest of checkpoint ``root``; None when it has none (the checkpoint is damaged)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        manifest["files"].items()
    except (ValueError, KeyError, AttributeError) as e:
        return {"format": 1, "algorithm": None, "files": {}, "unreadable": f"{path}: {e}"}
    return manifest


def verify(root: str | Path, manifest: dict, mode: str) -> list[str]:
    """Collective: what is wrong with the files of checkpoint ``root`` against ``manifest`` (empty: all
    good).  ``mode``: ``checksum`` | ``size`` | ``none``; checksums only where the manifest has them."""
    if mode == "none":
        return []
    root = Path(root)
    rank, world = _world()
    if "unreadable" in manifest:
        return [f"{MANIFEST} unreadable: {manifest['unreadable']}"]
    problems: list[str] = []
    if rank == 0:
        actual = dict(list_files(root))
        for name, entry in manifest["files"].items():
            if name not in actual:
                problems.append(f"{name}: missing")
            elif actual[name] != entry["size"]:
                problems.append(f"{name}: {actual[name]} bytes, the manifest says {entry['size']}")
        problems += [f"{name}: not in the manifest" for name in sorted(set(actual) - set(manifest["files"]))]
    problems = broadcast_from_rank0(problems, world_group())
    if problems or mode == "size" or manifest.get("algorithm") != "sha256":
        return problems
    files = [(name, e["size"]) for name, e in manifest["files"].items()]

    def one(name: str) -> tuple[str, str]:
        return name, sha256_file(root / name)

    with ThreadPoolExecutor(_THREADS) as pool:
        digests = _gather(dict(pool.map(one, _my_share(files, rank, world))))
    return [
        f"{name}: SHA-256 {digests[name][:12]}... differs from the manifest's {e['sha256'][:12]}..."
        for name, e in sorted(manifest["files"].items())
        if digests[name] != e["sha256"]
    ]
