"""The recall_dist trainer under Ray Train (V2): a ``TorchTrainer`` whose workers call ``run_training``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_train.py configs/tiny_cpu.yaml train.output_dir=/shared/runs/tiny [ray.num_workers=2 ...]

Arguments are those of ``recall-dist train`` (a config and ``key=value`` overrides) plus ``ray.*`` keys
(``RayConfig`` below: workers, GPUs, placement over the nodes, failure handling, Ray's storage).  Ray
sets up the process group (gloo on CPU, NCCL on GPU); the trainer joins it.

Checkpoints: after each complete checkpoint of ours (``run_training``'s ``on_checkpoint``), every rank
calls ``ray.train.report``; rank 0 attaches a *pointer* checkpoint, a tiny directory naming our
checkpoint directory, which Ray copies into its run state (``ray.storage_path``/``ray.name``).  Our
checkpoints are not copied: they hold the sharded model and optimizer, the data position, RNG and
truncation buffer, and are already on storage every node sees.

Failure handling: when a worker or its node dies, Ray restarts the worker group (up to
``ray.max_failures`` times; on the nodes left, or on a node that joins, as the placement allows) and
each worker asks ``ray.train.get_checkpoint()``: the last reported pointer names the checkpoint all
ranks reported, and the run resumes from it, or from a later complete one saved before the failure
but not yet registered by Ray (``resume_after_restore``).  Re-submitting the same command resumes the same way
(Ray Train restores its run state from ``(ray.storage_path, ray.name)``), or, without Ray's state,
from ``train.resume: auto`` (the latest complete checkpoint in ``train.output_dir``).  So
``train.output_dir`` must be on storage every node sees, and it must not be relative to the job's
working dir (a temporary copy): a relative ``train.output_dir`` is placed under
``$RECALL_DIST_OUTPUT_ROOT`` (default ``~/recall_dist``).

Every rank calls ``ray.train.report`` the same number of times: once per checkpoint, then once with
the run's summary.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import recall_dist  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_cli import split_args, under_output_root

from recall_dist.configtree import ConfigError, check
from recall_dist.train.cli import EXIT_DIVERGED, EXIT_REFUSED
from recall_dist.train.rundir import DIVERGED

# SPREAD: one worker per node as far as the nodes allow (soft: a restart after a lost node may pack
# the group on the nodes left); STRICT_SPREAD: never two on one node; PACK / STRICT_PACK: fewest nodes.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
POINTER_FILE = "recall_dist_checkpoint.json"  # in the checkpoints reported to Ray: {"path": ..., "step": ...}


@dataclass
class RayConfig:
    """How the run is laid out on the Ray cluster (``ray.key=value`` on the command line)."""

    num_workers: int = 2  # training ranks (one per GPU with use_gpu)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # of the workers over the nodes (a Ray placement group strategy)
    max_failures: int = 2  # worker-group restarts; each resumes from the latest checkpoint
    storage_path: str | None = None  # Ray Train's run state; None: <train.output_dir>/ray
    name: str | None = None  # Ray Train run name; None: the basename of train.output_dir

    def __post_init__(self):
        check(self.num_workers >= 1, "num_workers", self.num_workers, "an integer >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "a number > 0")
        check(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            self.placement_strategy,
            f"one of {', '.join(PLACEMENT_STRATEGIES)}",
        )
        check(self.max_failures >= -1, "max_failures", self.max_failures, "an integer >= 0, or -1 (unlimited)")


def parse_args(argv: list[str]):
    """``CONFIG.yaml [key=value ...]`` -> (TrainConfig, RayConfig); ``ray.*`` keys go to RayConfig."""
    from recall_dist.train.config import load_train_config

    config, overrides, ray_cfg = split_args(argv, RayConfig, __doc__)
    cfg = load_train_config(config, overrides)
    cfg.train.output_dir = under_output_root(cfg.train.output_dir)
    return cfg, ray_cfg


def report_checkpoint(path, step: int, rank: int) -> None:
    """``on_checkpoint``: report our complete checkpoint ``path`` to Ray Train (every rank; rank 0
    attaches a pointer to it, which Ray keeps in its run state and hands back after a restart)."""
    import ray.train

    metrics = {"step": step, "checkpoint_dir": str(path)}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="recall_dist_pointer_") as tmp:
        (Path(tmp) / POINTER_FILE).write_text(json.dumps({"path": str(path), "step": step}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restored_checkpoint() -> Path | None:
    """Our checkpoint directory named by the checkpoint Ray Train hands this worker (None: a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as pointer_dir:
        return Path(json.loads((Path(pointer_dir) / POINTER_FILE).read_text())["path"])


def release_lock_of_dead_node(output_dir: Path, wait_s: float = 60.0) -> None:
    """Remove ``<output_dir>/LOCK`` when its holder ran on a node Ray has declared dead.

    The lock (docs/robustness.md) keeps a second run out of the directory; a holder on another host
    is only judged by its heartbeat, so the previous worker group's rank 0, lost with its node, would
    keep the restarted group out for minutes.  Ray knows that node is gone, and its processes with
    it.  The group can restart before Ray has noticed (the lost worker's connection is refused at
    once; the node is declared dead after missed heartbeats): wait up to ``wait_s`` for the verdict."""
    import ray

    from recall_dist.train.rundir import LOCK_NAME

    lock, deadline = output_dir / LOCK_NAME, time.monotonic() + wait_s
    while True:
        try:
            host = json.loads(lock.read_text()).get("host")
        except (OSError, ValueError):
            return  # released, or none
        if host == socket.gethostname():
            return  # the trainer sees for itself whether the holder's process is alive
        nodes = ray.nodes()
        alive = {n["NodeManagerHostname"] for n in nodes if n["Alive"]}
        if host in {n["NodeManagerHostname"] for n in nodes if not n["Alive"]} - alive:
            lock.unlink(missing_ok=True)
            print(f"ray_train: removed {lock}: its holder ran on {host}, which Ray declared dead", flush=True)
            return
        if time.monotonic() > deadline:
            return  # a live holder: the trainer refuses to start and names it
        time.sleep(1.0)


def resume_after_restore(restored: Path, output_dir: Path, rank: int) -> str:
    """``train.resume`` for a worker group that Ray restarted with checkpoint ``restored``.

    A pointer into this run's own checkpoints: ``auto``, the newest complete one, which is that one
    or a later one saved before the failure but not yet registered by Ray (the trainer refuses to
    resume an older checkpoint of a directory holding newer ones).  A pointer elsewhere (the run
    moved): that directory."""
    from recall_dist.train.rundir import COMPLETE

    own = restored.resolve().parent == (output_dir / "checkpoints").resolve()
    if rank == 0:
        then = "the newest complete checkpoint at or after it" if own else "it"
        print(f"ray_train: Ray Train restored checkpoint {restored}; resuming from {then}", flush=True)
    if own:
        return "auto"
    if not (restored / COMPLETE).is_file():
        raise FileNotFoundError(f"Ray Train restored checkpoint {restored}, which is not a complete checkpoint")
    return str(restored)


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: the process group exists (Ray made it); resume from the checkpoint Ray
    hands back (if any), train while reporting each checkpoint, then report the summary."""
    import ray.train

    from recall_dist.train.trainer import TrainingDiverged, run_training

    cfg, rank = loop_config["cfg"], ray.train.get_context().get_world_rank()
    restored = restored_checkpoint()
    if restored is not None and rank == 0:  # a restarted group: the previous one is gone
        release_lock_of_dead_node(Path(cfg.train.output_dir))
    if restored is not None:
        cfg.train.resume = resume_after_restore(restored, Path(cfg.train.output_dir), rank)
    try:
        summary = run_training(cfg, on_checkpoint=lambda path, step: report_checkpoint(path, step, rank))
    except TrainingDiverged:
        # Every rank sees the same all-reduced non-finite steps and stops here.  Not a failure for Ray
        # to retry (a restarted group would resume the same checkpoint and diverge again): the workers
        # end normally and the driver reads <output_dir>/DIVERGED, which each start of a run clears.
        return
    last = summary.get("last") or {}
    ray.train.report(
        {
            "step": summary["step"],
            "total_steps": summary["total_steps"],
            "preempted": summary["preempted"],
            "skipped_steps": summary["skipped_steps"],
            "loss": last.get("loss"),
            "nll": last.get("nll"),
            "output_dir": summary["output_dir"],
        }
    )


def build_trainer(cfg, ray_cfg: RayConfig):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray_cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    output_dir = Path(cfg.train.output_dir)
    storage = Path(ray_cfg.storage_path).expanduser().resolve() if ray_cfg.storage_path else output_dir / "ray"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
            placement_strategy=ray_cfg.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=str(storage),
            name=ray_cfg.name or output_dir.name,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            # Ray keeps the last pointers only; our own checkpoints are pruned by train.keep_checkpoints.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, ray_cfg = parse_args(argv)
    except ConfigError as e:
        print(f"ray_train: config error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    import ray

    ray.init()  # inside `ray job submit`: the job's cluster; otherwise RAY_ADDRESS or a local one
    print(f"ray_train: {ray_cfg} -> {cfg.train.output_dir}", flush=True)
    result = build_trainer(cfg, ray_cfg).fit()
    if result.error is not None:
        print(f"ray_train: failed: {result.error}", file=sys.stderr)
        return 1
    diverged = Path(cfg.train.output_dir) / DIVERGED
    if diverged.is_file():
        report = json.loads(diverged.read_text())
        first, last = report.get("bad_steps", ["?", "?"])
        print(
            f"ray_train: training diverged: steps {first}-{last} had a non-finite loss or gradient norm; "
            f"stopped without saving or exporting, not retried (report: {diverged}). Lower optim.lr or "
            "check the data (docs/robustness.md).",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    preempted = Path(cfg.train.output_dir) / "PREEMPTED"
    if preempted.exists():  # the stop file (RECALL_DIST_STOP_FILE) was touched: checkpointed, not finished
        print(
            f"ray_train: stopped at step {preempted.read_text().strip()} (checkpoint saved); "
            "submit the same command again to resume",
            flush=True,
        )
        return 0
    print(f"ray_train: done: {cfg.train.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
