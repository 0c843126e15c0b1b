"""``recall_dist/io.py``: a process killed between the write and the rename leaves the old content (a
real subprocess, SIGKILLed at the rename), JSON round trips, directory publishing (fresh temporary
siblings, atomic replace, the first-writer-wins mode, recovery from a crash between the two renames),
fsync calls, disk-full detection and byte formatting against hand-computed values."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from recall_dist import io

REPO = Path(__file__).resolve().parents[1]


def _run_killed(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter; it SIGKILLs itself where the test says."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        check=False,  # the script is killed on purpose: the test reads its return code
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_kill_between_write_and_rename_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    done = _run_killed(
        """
        import os, signal, sys
        from recall_dist import io

        def killed(*args):  # the moment after the new content is on disk, before the rename
            os.kill(os.getpid(), signal.SIGKILL)

        os.replace = killed
        io.atomic_write_text(sys.argv[1], "new content")
        """,
        str(path),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert path.read_text() == "old"
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].read_text() == "new content"  # it was written, not renamed
    assert leftovers[0].name.startswith(".state.json.tmp-")  # hidden, beside the target


def test_json_round_trip_replaces_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "shard.json"
    path.write_text('{"old": true}')
    data = {"key": {"a": [1, 2.5, None]}, "text": "é", "nan": float("nan")}
    assert io.atomic_write_json(path, data, indent=1, sort_keys=True) == path
    back = json.loads(path.read_text())
    assert back["key"] == data["key"] and back["text"] == "é" and back["nan"] != back["nan"]
    assert path.read_text() == json.dumps(data, indent=1, sort_keys=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.json"]


def test_a_failed_write_removes_its_temporary_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        io.atomic_write_json(path, {"not json": object()})
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("fsync,calls", [(True, 1), (False, 0)])
def test_fsync_is_optional(tmp_path, monkeypatch, fsync, calls):
    seen = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(fd), real(fd)))
    io.atomic_write_text(tmp_path / "f", "x", fsync=fsync)
    assert len(seen) == calls and (tmp_path / "f").read_text() == "x"


def test_fsync_tree_reaches_every_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_text(name)
    files, dirs = [], []
    monkeypatch.setattr(io, "fsync_file", lambda p: files.append(Path(p).relative_to(tmp_path).as_posix()))
    monkeypatch.setattr(io, "fsync_dir", lambda p: dirs.append(Path(p).relative_to(tmp_path).as_posix()))
    io.fsync_tree(tmp_path)
    assert sorted(files) == ["a/b/z", "a/y", "x"] and dirs == []
    files.clear()
    io.fsync_tree(tmp_path, files=False, directories=True)
    assert files == [] and sorted(dirs) == [".", "a", "a/b"]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def _make(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_fresh_temporary_sibling_replaces_a_crash_leftover(tmp_path):
    final = tmp_path / "step_00000004"
    assert io.temp_sibling(final) == tmp_path / ".tmp-step_00000004"
    assert io.temp_sibling(final, per_process=True) == tmp_path / f".tmp-step_00000004-{os.getpid()}"
    left = _make(io.temp_sibling(final), {"half": "written"})
    assert io.fresh_dir(left) == left and left.is_dir() and list(left.iterdir()) == []
    deep = io.fresh_dir(tmp_path / "a" / "b")
    assert deep.is_dir() and list(deep.iterdir()) == []


def test_publish_replaces_a_directory_and_leaves_no_temporary(tmp_path):
    final = _make(tmp_path / "final", {"old.txt": "old", "shared.txt": "1"})
    tmp = _make(tmp_path / ".tmp-final", {"new.txt": "new", "shared.txt": "2"})
    assert io.publish_dir(tmp, final)
    assert _tree(final) == {"new.txt": "new", "shared.txt": "2"}  # the old files are gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # First time: nothing to replace.
    tmp = _make(tmp_path / ".tmp-other", {"a": "b"})
    assert io.publish_dir(tmp, tmp_path / "other")
    assert _tree(tmp_path / "other") == {"a": "b"} and not tmp.exists()


def test_publish_without_replace_keeps_the_first(tmp_path):
    final = _make(tmp_path / "entry", {"tokens": "first"})
    tmp = _make(tmp_path / ".tmp-entry-1", {"tokens": "second"})
    assert not io.publish_dir(tmp, final, replace=False, fsync=False)
    assert _tree(final) == {"tokens": "first"} and not tmp.exists()
    tmp = _make(tmp_path / ".tmp-new-1", {"tokens": "x"})
    assert io.publish_dir(tmp, tmp_path / "new", replace=False)
    assert _tree(tmp_path / "new") == {"tokens": "x"}


def test_a_kill_between_the_two_renames_is_restored(tmp_path):
    final = _make(tmp_path / "final", {"model": "previous"})
    tmp = _make(tmp_path / ".tmp-final", {"model": "next"})
    done = _run_killed(
        """
        import os, signal, sys
        from recall_dist import io

        rename, calls = os.rename, []

        def rename_then_die(src, dst):
            calls.append(src)
            if len(calls) == 2:  # the old one is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            rename(src, dst)

        os.rename = rename_then_die
        io.publish_dir(sys.argv[1], sys.argv[2])
        """,
        str(tmp),
        str(final),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not final.exists() and _tree(tmp_path / ".old-final") == {"model": "previous"}
    assert io.restore_interrupted(final)
    assert _tree(final) == {"model": "previous"} and not (tmp_path / ".old-final").exists()
    assert not io.restore_interrupted(final)  # nothing left to restore


def test_disk_full_is_recognised(tmp_path, monkeypatch):
    assert io.is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path)
    assert io.is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), tmp_path)
    assert not io.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert io.is_disk_full(outer, tmp_path)
    # A checkpoint library's error that collects each rank's failure.
    collected = RuntimeError("checkpoint failed")
    collected.failures = {0: (OSError(errno.ENOSPC, "full"), "traceback")}
    assert io.is_disk_full(collected, tmp_path)
    # torch's zip writer drops the errno: the free space decides.
    writer = RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0")
    assert not io.is_disk_full(writer, tmp_path)
    monkeypatch.setattr(io, "free_bytes", lambda path: 1 << 20)
    assert io.is_disk_full(writer, tmp_path)


def test_free_bytes_looks_at_the_nearest_existing_parent(tmp_path, monkeypatch):
    seen = []

    def disk_usage(path):
        seen.append(Path(path))
        if len(seen) > 1:
            raise PermissionError(path)
        return SimpleNamespace(free=123)

    monkeypatch.setattr(io.shutil, "disk_usage", disk_usage)
    assert io.free_bytes(tmp_path / "not" / "yet") == 123 and seen == [tmp_path]
    assert io.free_bytes(tmp_path) == 0  # unknown counts as nothing free


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * 1024**2, "64.0 MiB"),
        (3 * 1024**3 + 512 * 1024**2, "3.5 GiB"),
        (2 * 1024**4, "2.0 TiB"),
        (5 * 1024**5, "5120.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert io.format_bytes(n) == text
