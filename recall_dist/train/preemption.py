"""Preemption contract (what the Slurm and Ray launchers rely on).

A stop is requested by SIGTERM or SIGUSR1 on any worker, or by the file named in the env var
``RECALL_DIST_STOP_FILE`` existing (the batch script touches it: torchrun does not forward SIGUSR1,
pytorch #154849).  Workers agree at the next step boundary (all-reduce MAX of the flag), save a
checkpoint, write ``<output_dir>/PREEMPTED`` holding the step, and exit 0; ``resume: auto`` continues.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from recall_dist.distributed.collectives import all_reduce_

STOP_FILE_ENV = "RECALL_DIST_STOP_FILE"
PREEMPTED = "PREEMPTED"
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Records stop requests; ``should_stop()`` is collective over ``group`` (None: this process only)."""

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        self.group, self.device = group, device
        self.signal_received: int | None = None
        self._previous: dict = {}
        # Signal handlers can only be set from the main thread (Ray Train runs the loop elsewhere;
        # there the stop file and Ray's own failure handling apply).
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_received = signum

    def requested_locally(self) -> bool:
        stop_file = os.environ.get(STOP_FILE_ENV)
        return self.signal_received is not None or bool(stop_file and Path(stop_file).exists())

    def should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.requested_locally() else 0.0], device=self.device)
        return bool(all_reduce_(flag, "max", self.group).item() > 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def mark_preempted(output_dir: str | Path, step: int) -> Path:
    path = Path(output_dir) / PREEMPTED
    path.write_text(f"{step}\n")
    return path


def clear_preempted(output_dir: str | Path) -> None:
    (Path(output_dir) / PREEMPTED).unlink(missing_ok=True)
