"""Crash-safe file writes, the one home of each: atomic text / JSON files, fsync of files and
directories, publishing a finished temporary directory under its final name, and telling a full disk
from other write failures.  Used by checkpoints, the final export, metrics, the data cache, the sweep's
shard files and the launcher's outcome file; no torch, no distribution.

Atomic means a reader (or the next run, after a crash at any moment) sees the old content or the new
one, never a mix: the new content goes to a temporary name in the same directory (same file system, so
``os.replace`` is one rename), then replaces the old name.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

_NEARLY_FULL = 64 << 20  # bytes free under which a failed write is reported as a full disk


# ---------------------------------------------------------------------------------------------- fsync


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (it survives a power loss from now on)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush ``path``'s directory entries: a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path, files: bool = True, directories: bool = False) -> None:
    """Under ``root``: ``fsync_file`` every file (``files``), ``fsync_dir`` every directory (``directories``)."""
    for dirpath, _, names in os.walk(root):
        if files:
            for name in names:
                fsync_file(os.path.join(dirpath, name))
        if directories:
            fsync_dir(dirpath)


# ------------------------------------------------------------------------------------ atomic files


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    """Replace ``path``'s content by ``text`` atomically.  ``fsync``: the data reaches the disk before
    the rename, so after a power loss the name holds the old or the new content, never an empty file;
    without it a crash of the process (not of the machine) is still safe.  The temporary name is
    hidden and carries the pid, so writers in other processes never share one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data, fsync: bool = True, **dump_options) -> Path:
    """``atomic_write_text`` of ``json.dumps(data, **dump_options)``."""
    return atomic_write_text(path, json.dumps(data, **dump_options), fsync=fsync)


# ------------------------------------------------------------------------------------- directories


def temp_sibling(final: str | Path, per_process: bool = False) -> Path:
    """Where ``final``'s next version is built: ``.tmp-<name>`` beside it (``-<pid>`` with
    ``per_process``: for entries that several processes may build at once)."""
    final = Path(final)
    return final.with_name(f".tmp-{final.name}-{os.getpid()}" if per_process else f".tmp-{final.name}")


def fresh_dir(path: str | Path) -> Path:
    """An empty directory at ``path``; what a crash left there before is deleted."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def publish_dir(tmp: str | Path, final: str | Path, replace: bool = True, fsync: bool = True) -> bool:
    """Give the finished directory ``tmp`` (a sibling of ``final``) the name ``final``.

    ``replace``: an existing ``final`` is renamed ``.old-<name>`` first and deleted only once the new
    one is in place (and, with ``fsync``, the parent's entries are on disk), so a complete directory
    exists at every moment; a crash between the two renames leaves the previous one as ``.old-<name>``
    (``restore_interrupted`` puts it back).  ``replace=False``: the first one published wins; if
    ``final`` cannot take the name (it exists), ``tmp`` is deleted.  Returns whether ``tmp`` was
    published.  ``fsync`` only concerns the parent directory: fsync the files before (``fsync_tree``)."""
    tmp, final = Path(tmp), Path(final)
    if not replace:
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if fsync:
            fsync_dir(final.parent)
        return True
    old = _aside(final)
    replaced = final.exists()
    if replaced:
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if fsync:
        fsync_dir(final.parent)
    if replaced:
        shutil.rmtree(old)
    return True


def restore_interrupted(final: str | Path) -> bool:
    """A crash between the two renames of ``publish_dir`` left the previous ``final`` as
    ``.old-<name>`` and no ``final``: rename it back.  Returns whether it did."""
    final = Path(final)
    old = _aside(final)
    if old.exists() and not final.exists():
        os.rename(old, final)
        return True
    return False


# --------------------------------------------------------------------------------------- disk full


def _exception_chain(exc: BaseException):
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None]


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """Whether ``exc`` (raised while writing under ``path``) comes from a full disk or quota.  torch's
    zip writer drops the errno ("file write failed"), so then the free space decides."""
    write_failed = False
    for e in _exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        write_failed |= any(s in text for s in ("file write failed", "PytorchStreamWriter failed", "unexpected pos"))
    return write_failed and free_bytes(path) < _NEARLY_FULL


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system of ``path`` (of its nearest existing parent); 0 if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units up to TiB, one decimal (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
