"""Preemption contract (what the Slurm and Ray launchers rely on).

A stop is requested by SIGTERM or SIGUSR1 on any worker, or by the file named in the env var
``RECALL_DIST_STOP_FILE`` existing (the batch script touches it: torchrun does not forward SIGUSR1,
pytorch #154849).  Workers agree at the next step boundary (all-reduce MAX of the flag), save a
checkpoint, write ``<output_dir>/PREEMPTED`` holding the step (``rundir/layout.py``: the marker), and
exit 0; ``resume: auto`` continues.

Launchers: ``recall-dist torchrun`` (``recall_dist/torchrun.py``) sets ``RECALL_DIST_OUTCOME_FILE``;
local rank 0 writes the run's outcome and exit code there (``write_outcome``), because torchrun itself
reports 1 for anything but a clean exit of every worker (and after any signal).  Workers under torchrun
die with it (``die_with_parent``): a SIGKILLed torchrun leaves no orphan holding GPUs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from recall_dist.distributed.collectives import all_reduce_
from recall_dist.io import atomic_write_json

STOP_FILE_ENV = "RECALL_DIST_STOP_FILE"
OUTCOME_FILE_ENV = "RECALL_DIST_OUTCOME_FILE"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
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


def write_outcome(outcome: str, exit_code: int, **details) -> None:
    """Tell the launcher how the run ended (``recall-dist torchrun`` exits with ``exit_code``): written
    atomically by local rank 0 when ``RECALL_DIST_OUTCOME_FILE`` is set, a no-op otherwise."""
    path = os.environ.get(OUTCOME_FILE_ENV)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    # No fsync (as before): the launcher reads the file on this host as soon as the worker exits; a
    # power loss ends the job and its launcher with it.
    atomic_write_json(path, {"outcome": outcome, "exit_code": exit_code, **details}, fsync=False)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``);
    returns False where that does not exist.  If the parent is already gone, die now."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:  # the parent died between getppid() and prctl(): no signal will come
        os.kill(os.getpid(), sig)
    return True
