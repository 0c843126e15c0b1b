"""What a model directory holds, as one hash: the sweep keys its shard files by it, so a model
retrained (or overwritten) at the same path is evaluated again, and an unchanged one is not.

Two modes (``SweepConfig.model_fingerprint``):

- ``content`` (default): for every regular file below the directory (recursively, sorted by
  relative path), its relative path, size and the sha256 of its bytes.  Exact; it reads every
  file once per process (about the cost of loading the weights: ~1-2 GB/s), and a process
  re-reads a file only when its size or modification time changed.
- ``stat``: relative path, size and modification time (ns) of every file, no read.  For models
  so large that reading them twice is too slow; a rewrite with identical bytes then counts as a
  change (recomputed, never stale), and only a file whose mtime was set back by hand can fool it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 24
_content_cache: dict[tuple, str] = {}


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(root)!r} does not exist")
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def file_sha256(path: Path) -> str:
    """sha256 of ``path``'s bytes, memoised per process by (path, size, mtime_ns)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _content_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        _content_cache[key] = digest.hexdigest()
    return _content_cache[key]


def directory_fingerprint(path: str | os.PathLike, mode: str = "content") -> str:
    """A hex digest of the files below ``path`` (or of the file ``path``) in ``mode``."""
    if mode not in ("content", "stat"):
        raise ValueError(f"model_fingerprint = {mode!r}: allowed: content, stat")
    root = Path(path).expanduser()
    entries = []
    for file in _files(root):
        st = file.stat()
        rel = file.name if file == root else file.relative_to(root).as_posix()
        entries.append([rel, st.st_size, file_sha256(file) if mode == "content" else st.st_mtime_ns])
    return hashlib.sha256(json.dumps([mode, entries]).encode()).hexdigest()
