"""The trainer, read top to bottom: set-up (process group, data, loss, model, engine, checkpoint),
one ``train_step``, the held-out ``evaluate``, the loop, the end (final checkpoint and Hugging Face export).

``run_training(cfg)`` is the whole run; ``recall-dist train`` and Ray Train's
``train_loop_per_worker`` both call it (under Ray the process group already exists).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recall_dist.configtree import to_dict
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.cache import load_dataset
from recall_dist.data.loader import DistributedBatchIterator, eval_batches
from recall_dist.data.validation import validate_data_source
from recall_dist.distributed.collectives import all_reduce_
from recall_dist.distributed.process_group import init_distributed, shutdown
from recall_dist.log import get_logger
from recall_dist.losses.accumulator import step_token_count
from recall_dist.train.backends.build import build_engine
from recall_dist.train.config import TrainConfig
from recall_dist.train.export import base_generation_config, export_from_engine
from recall_dist.train.metrics_log import (
    EVAL_PREFIX,
    LowEssWarning,
    MetricsLogger,
    mark_nonfinite,
    nonfinite_step,
    progress_fields,
    throughput,
)
from recall_dist.train.precision import resolve_compute_bf16
from recall_dist.train.preemption import PreemptionWatcher
from recall_dist.train.resources import validate_resources
from recall_dist.train.rundir import (
    Checkpointer,
    checkpoint_step,
    clear_diverged,
    clear_preempted,
    latest_checkpoint,
    mark_diverged,
    mark_no_final_checkpoint,
    mark_preempted,
    open_run,
    rng_state,
    set_rng_state,
)


@dataclass
class Run:
    """Everything the loop touches, built once by ``setup``."""

    cfg: TrainConfig
    ctx: object
    tokenizer: object
    batches: DistributedBatchIterator
    loss: object
    engine: object
    accumulation_steps: int
    total_steps: int
    eval_set: Sequence[dict] | None = None  # the tokenised validation set (data.eval_split / eval_source)
    step: int = 0
    skipped_steps: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig, tokenizer, ctx) -> Run:
    seed_everything(cfg.train.seed)
    resolve_compute_bf16(cfg, ctx)  # backend.bf16=auto -> true/false, logged, and saved so with the config
    # Tokenised once (rank 0) and memory-mapped by every rank (data/cache.py).
    barrier = torch.distributed.barrier if ctx.world_size > 1 else None
    dataset = load_dataset(cfg.data, tokenizer, ctx.rank, barrier)
    accumulation = cfg.train.accumulation_steps(ctx.world_size)
    batches = DistributedBatchIterator(
        dataset,
        cfg.train.micro_batch_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.train.seed,
        packing=cfg.data.packing,
        max_length=cfg.data.max_length,
        pad_token_id=tokenizer.pad_token_id or 0,
        accumulation_steps=accumulation,
    )
    total = cfg.train.epochs * len(batches) // accumulation
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    eval_cfg = cfg.data.eval_config()
    eval_set = None if eval_cfg is None else load_dataset(eval_cfg, tokenizer, ctx.rank, barrier)
    loss = cfg.loss.build()
    # The engine builds the model itself, sharded or partitioned from the start (backends/__init__.py).
    engine = build_engine(cfg, ctx, loss, accumulation, total)
    return Run(cfg, ctx, tokenizer, batches, loss, engine, accumulation, total, eval_set)


def endless(batches: DistributedBatchIterator):
    """Micro-batches across epochs; the iterator's own state says where it is (resumable)."""
    while True:
        yield from batches


def train_step(run: Run, data, before_update=None) -> dict[str, float]:
    """One optimizer step = one weighted NLL over all of its tokens (``losses/accumulator.py``): every
    micro-batch's gradient with the step's provisional scale, then the engine rescales the sum by the
    step's exact normaliser before clipping and the update (``train/step_scale.py``).  A skipped step
    (non-finite tokens, or no token with weight: its gradient scale is ``SKIP``) or a non-finite gradient
    norm leaves the model and the optimizer as they were.
    ``before_update(grad_scale, stats)``, if given, runs after the backward passes, before the update
    (the accumulated gradients times ``grad_scale`` are the step's gradient)."""
    engine, device, dp_group = run.engine, run.ctx.device, run.ctx.dp_group
    micro = [{k: v.to(device) for k, v in next(data).items()} for _ in range(run.accumulation_steps)]
    input_tokens = all_reduce_(sum((b["sequence_ids"] >= 0).sum() for b in micro).reshape(1), "sum", dp_group)
    # N: the collate already ignores each packed example's first token (no position_ids masking here)
    with run.loss.optimizer_step(step_token_count(micro, dp_group, mask_sequence_starts=False)) as objective:
        for batch in micro:
            if run.cfg.data.packing:  # attend within each packed example: HF derives it from position_ids
                batch.pop("attention_mask")
            loss, _ = engine.forward(batch)
            engine.backward(loss)
        grad_scale = objective.gradient_scale()
        stats = objective.stats() | run.loss.rule.extra_stats()
        stats["top1pct_share"] = objective.top_share(dp_group)  # collective: every rank, every step
    stats["lr"] = engine.lr()  # the rate this step's update uses
    if before_update is not None:
        before_update(grad_scale, stats)
    result = engine.step(grad_scale=grad_scale)
    stats.update(skipped=float(result.skipped), input_tokens=float(input_tokens.item()))
    if result.grad_norm is not None:
        stats["grad_norm"] = result.grad_norm
    return stats


log = get_logger("train")
EVAL_STATS = ("loss", "nll", "tokens")


def evaluate(run: Run) -> dict[str, float]:
    """The validation set's objective and NLL (``eval_loss``, ``eval_nll``, ``eval_tokens``) with the
    current weights: the whole set is one step of the loss (``losses/accumulator.py``), so
    ``eval_loss = (1 - m) sum_n w_n l_n / Z + m sum_n l_n / N`` over every token of the set on every
    data-parallel rank, exact and global (each example on one rank, once).  The weights are those the
    next training step would use (a truncation rule's threshold comes from the training buffer); the
    loss's state is put back afterwards, so evaluating never changes the training trajectory.  No
    gradient, no update; collective (every rank calls it at the same step)."""
    engine, ctx, loss = run.engine, run.ctx, run.loss
    pad = run.tokenizer.pad_token_id or 0
    mine = list(range(ctx.rank, len(run.eval_set), ctx.world_size))
    local = sum(np.count_nonzero(np.asarray(run.eval_set[i]["labels"][1:]) != IGNORE_INDEX) for i in mine)
    token_count = all_reduce_(torch.tensor([float(local)], dtype=torch.float64), "sum", ctx.dp_group).item()
    state, module = loss.state_dict(), engine.module
    module.train(False)
    try:
        with torch.no_grad(), loss.optimizer_step(token_count) as objective:
            for batch in eval_batches(run.eval_set, run.cfg.train.micro_batch_size, ctx.rank, ctx.world_size, pad):
                engine.forward({k: v.to(ctx.device) for k, v in batch.items()})
            stats = objective.stats()
    finally:
        loss.load_state_dict(state)
        module.train(True)
    return {f"{EVAL_PREFIX}{key}": stats[key] for key in EVAL_STATS}


def eval_due(run: Run) -> bool:
    """Evaluate after every ``train.eval_every`` steps and after the last one (when there is a validation set)."""
    every = run.cfg.train.eval_every
    return run.eval_set is not None and (run.step == run.total_steps or (every > 0 and run.step % every == 0))


def save_checkpoint(run: Run, checkpointer: Checkpointer) -> Path:
    state = {
        "step": run.step,
        "skipped_steps": run.skipped_steps,
        "data": run.batches.state_dict(),
        "loss": run.loss.state_dict(),
        "rng": rng_state(),
        "world_size": run.ctx.world_size,
    }
    return checkpointer.save(run.engine, run.step, state, to_dict(run.cfg))


def resume(run: Run, checkpointer: Checkpointer, path: Path | None) -> None:
    """Continue from checkpoint ``path`` (picked and verified by ``open_run``); None: a fresh start."""
    if path is None:
        return
    state = checkpointer.load(path, run.engine)
    if state["step"] != checkpoint_step(path):
        raise RuntimeError(f"{path}: trainer state is for step {state['step']}")
    run.step, run.skipped_steps = state["step"], state["skipped_steps"]
    run.batches.load_state_dict(state["data"])
    run.loss.load_state_dict(state["loss"])
    set_rng_state(state["rng"])
    if run.ctx.rank == 0:  # visible in job logs: a requeued/restarted job says where it picked up
        log.info("resumed from %s at step %d", path, run.step)


def run_training(cfg: TrainConfig, on_checkpoint=None) -> dict:
    """Train as ``cfg`` says; returns a summary (final step, last stats, preempted or not, paths).

    ``on_checkpoint(path, step)``, when given, is called on every rank right after each complete
    checkpoint (Ray Train reports it, so that its restore hands restarted workers the right one)."""
    # The RECALL_DIST_* kernel variables, read here once: the saved config and the metrics say what ran.
    cfg = cfg.with_environment()
    tokenizer = validate_resources(cfg)  # config errors surface before anything is written
    validate_data_source(cfg.data, tokenizer)  # and bad data, before any process group exists
    ctx = init_distributed(cfg.train.dist_timeout_minutes)
    lock = None
    try:
        # The output_dir's lock, the rules for a used one, the verified checkpoint of the same experiment.
        lock, start = open_run(cfg, ctx)
        return _train(cfg, tokenizer, ctx, start, on_checkpoint)
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)


class TrainingDiverged(RuntimeError):
    """``train.max_bad_steps`` consecutive non-finite steps: the run stopped, saved nothing, exported nothing."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _diverged(run: Run, out: Path, bad_steps: int, stats: dict) -> TrainingDiverged:
    first, is_main = run.step - bad_steps + 1, run.ctx.is_main
    if is_main:
        mark_diverged(out, {"step": run.step, "bad_steps": [first, run.step], "last": stats})
    latest = latest_checkpoint(out / "checkpoints")
    return TrainingDiverged(
        f"training diverged: steps {first}-{run.step} ({bad_steps} in a row = train.max_bad_steps) had a "
        f"non-finite loss or gradient norm (last: loss {stats.get('loss')}, grad_norm {stats.get('grad_norm')}); "
        f"stopped without saving or exporting (report: {out / 'DIVERGED'}; latest checkpoint: "
        f"{latest or 'none'}).  Lower optim.lr or check the data, then start over (train.resume=none "
        f"train.overwrite=true) or continue that checkpoint with train.allow_config_change=true.",
        run.step,
    )


def _finish(run: Run, out: Path, checkpointer: Checkpointer, saved_at, preempted: bool, on_checkpoint) -> None:
    """The end of a run that did not diverge: a checkpoint of its last step unless there is one already
    (skipped with ``train.final_checkpoint: false``, except on preemption, which must be resumable), then
    the ``PREEMPTED`` marker, or the export to ``final/`` (with the base model's generation config)."""
    cfg, ctx = run.cfg, run.ctx
    checkpointed = saved_at == run.step
    if not checkpointed and (preempted or cfg.train.final_checkpoint):
        path = save_checkpoint(run, checkpointer)
        checkpointed = True
        if on_checkpoint is not None:
            on_checkpoint(path, run.step)
    if preempted:
        if ctx.is_main:
            mark_preempted(out, run.step)
        return
    if cfg.train.export_final:
        generation = base_generation_config(cfg.model.name_or_path) if ctx.rank == 0 else None
        export_from_engine(
            run.engine,
            run.tokenizer,
            out / "final",
            ctx.rank,
            cfg.model.dtype,
            generation,
            lora=cfg.model.lora,  # final/ is the adapter (or, merge_on_export, the merged model)
            base_model_name_or_path=cfg.model.name_or_path,
        )
    if not checkpointed and ctx.is_main:  # after final/ exists: the marker refuses a later start here
        latest = latest_checkpoint(out / "checkpoints")
        mark_no_final_checkpoint(out, {"step": run.step, "latest_checkpoint": None if latest is None else str(latest)})
        log.info(
            "train.final_checkpoint=false: no checkpoint of the last step %d (latest: %s); %s holds the model. "
            "This run cannot be resumed or extended: a new start in %s is refused unless train.overwrite=true "
            "moves it aside.",
            run.step,
            latest or "none",
            out / "final",
            out,
        )


def _train(cfg: TrainConfig, tokenizer, ctx, start: Path | None = None, on_checkpoint=None) -> dict:
    run = setup(cfg, tokenizer, ctx)
    out = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(out, ctx.rank, cfg.train.keep_checkpoints, cfg.train.verify_checkpoints)
    resume(run, checkpointer, start)
    logger = MetricsLogger(out, ctx.is_main, cfg.train.tensorboard, cfg.train.wandb, to_dict(cfg))
    logger.truncate_after(run.step)
    logger.log_header(run.step, {"kernel": to_dict(cfg.loss.kernel_options())})  # as resolved at the start
    if ctx.is_main:
        clear_preempted(out)
        clear_diverged(out)
    watcher = PreemptionWatcher(ctx.dp_group, ctx.device)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=not (ctx.is_main and cfg.train.progress_bar),
        desc=f"train {cfg.loss.name}",
        dynamic_ncols=True,
    )
    # A resumed run already has a checkpoint at its starting step.
    data, stats, saved_at, preempted = endless(run.batches), {}, (run.step or None), False
    bad_steps = 0  # consecutive non-finite steps (the same count on every rank: the stats are global)
    last_eval = {}  # the progress line shows the last validation loss
    low_ess = LowEssWarning(cfg.train.ess_warn_fraction, cfg.train.ess_warn_steps, enabled=ctx.is_main)
    try:
        while run.step < run.total_steps:
            began = time.perf_counter()
            stats = train_step(run, data)
            run.step += 1
            run.skipped_steps += int(stats["skipped"])
            bad_steps = bad_steps + 1 if nonfinite_step(stats) else 0
            mark_nonfinite(stats)
            stats.update(throughput(stats, time.perf_counter() - began), skipped_steps=run.skipped_steps)
            low_ess.update(run.step, stats)
            evaluated = eval_due(run)
            if evaluated:
                stats.update(evaluate(run))
                last_eval = {"eval_loss": f"{stats['eval_loss']:.4f}"}
            if evaluated or bad_steps or run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
                logger.log(run.step, stats)
            bar.update(1)
            bar.set_postfix(progress_fields(stats, last_eval))
            if bad_steps >= cfg.train.max_bad_steps:
                break
            if cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0:
                path = save_checkpoint(run, checkpointer)
                saved_at = run.step
                if on_checkpoint is not None:
                    on_checkpoint(path, run.step)
            if run.step < run.total_steps and watcher.should_stop():
                preempted = True
                break
        diverged = None
        if bad_steps >= cfg.train.max_bad_steps:  # no checkpoint of a diverged state, no export
            diverged = _diverged(run, out, bad_steps, stats)
        else:
            _finish(run, out, checkpointer, saved_at, preempted, on_checkpoint)
        # Leave together: a rank that tears down its gloo group while another still writes the
        # export was seen to abort at exit ("terminate called without an active exception").
        # Success path only: after an exception a barrier could wait forever on a dead peer.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        bar.close()
        watcher.close()
        logger.close()
    if diverged is not None:
        raise diverged
    return {
        "step": run.step,
        "total_steps": run.total_steps,
        "preempted": preempted,
        "skipped_steps": run.skipped_steps,
        "last": stats,
        "output_dir": str(out),
        "final_dir": None if preempted or not cfg.train.export_final else str(out / "final"),
    }
