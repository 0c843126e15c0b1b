"""Run a function in N real processes with a real ``torch.distributed`` gloo group (CPU).

The one helper every distributed test goes through (as OLMo-core's ``run_distributed_test``):
free port on 127.0.0.1, ``spawn``, teardown in ``finally``, and any rank's exception re-raised in
the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recall_dist.distributed.net import free_port


def _worker(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, backend: str, errors
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
        fn(*args, **kwargs)
        dist.barrier()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The test passed and the group is gone.  Skip interpreter finalisation: C++ threads left by
    # third-party libraries (seen with DeepSpeed on gloo, ~1 run in 10) can abort there with
    # "terminate called without an active exception" (exit -6) after everything succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed_test(
    fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout: float = 300.0, **kwargs: Any
) -> None:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks of one gloo process group.

    ``fn`` must be importable (module level) so ``spawn`` can pickle it.  Inside, use
    ``dist.get_rank()`` and build sub-groups with ``dist.new_group`` (on every rank, same order).
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, backend, errors))
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        if failures:  # every rank's error: the first rank to fail is not always the lowest
            raise AssertionError("\n".join(f"rank {r} of {world_size} failed:\n{tb}" for r, tb in sorted(failures)))
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} did not finish within {timeout:.0f} s")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited with non-zero codes: {bad}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def tp_dp_groups(tp: int, dp: int) -> tuple[Any, Any]:
    """Megatron-style layout on ``tp * dp`` ranks: consecutive ranks form a TP group.

    Returns ``(tp_group, dp_group)`` for this rank (``None`` for a size-1 dimension).  Must be
    called on every rank (``new_group`` is collective).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp * dp:
        raise ValueError(f"world size {world} != tp {tp} x dp {dp}")
    tp_group = dp_group = None
    for d in range(dp):
        ranks = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(ranks)
        if rank in ranks and tp > 1:
            tp_group = g
    for t in range(tp):
        ranks = list(range(t, world, tp))
        g = dist.new_group(ranks)
        if rank in ranks and dp > 1:
            dp_group = g
    return tp_group, dp_group
