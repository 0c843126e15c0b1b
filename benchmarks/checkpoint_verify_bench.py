"""What the checkpoint manifest costs (docs/robustness.md): writing a checkpoint-like set of files, then
building its manifest (SHA-256 + fsync of every file) and checking it (``checksum`` and ``size`` modes),
against one plain read of the same bytes.

    .venv/bin/python benchmarks/checkpoint_verify_bench.py [--files 4] [--mib-per-file 256] [--dir /tmp]

Prints one table; the ratios compare rows of this one run.  Single process (one rank: the job's ranks
each hash their share, so a run of R ranks on a shared file system divides the work by up to R).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recall_dist.train.rundir.manifest import build_manifest, verify


def _drop_page_cache(root: Path) -> bool:
    """Best effort (root only): evict the files from the page cache so reads hit the disk."""
    try:
        for path in root.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--mib-per-file", type=int, default=256)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    total = args.files * args.mib_per_file * (1 << 20)
    try:

        def write() -> None:
            for i in range(args.files):
                path = root / "engine" / f"shard_{i}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"w": torch.randn(args.mib_per_file * (1 << 18))}, path)  # fp32: 4 bytes each
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

        def read() -> None:
            for path in sorted(root.rglob("*.pt")):
                with open(path, "rb") as f:
                    while f.read(8 << 20):
                        pass

        rows = [("write (torch.save + fsync)", _timed(write))]
        cold = _drop_page_cache(root)
        rows.append(("plain read", _timed(read)))
        _drop_page_cache(root)
        manifest = {}
        rows.append(("manifest: sha256 + fsync", _timed(lambda: manifest.update(build_manifest(root, checksum=True)))))
        _drop_page_cache(root)
        rows.append(("verify: checksum", _timed(lambda: verify(root, manifest, "checksum"))))
        rows.append(("verify: size", _timed(lambda: verify(root, manifest, "size"))))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = total / (1 << 20)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{args.files} files, {size:.0f} MiB in {args.dir}; page cache dropped between steps: {cold}")
    print(f"{os.cpu_count()} CPUs, load average {load} (other processes share them: absolute speeds vary)")
    print("| step | seconds | MiB/s | time / plain read | time / write |")
    print("|---|---|---|---|---|")
    read_s, write_s = rows[1][1], rows[0][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {size / seconds:.0f} | {seconds / read_s:.2f} | {seconds / write_s:.3f} |")


if __name__ == "__main__":
    main()
