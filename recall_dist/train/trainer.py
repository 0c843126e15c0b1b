"""The trainer, read top to bottom: set-up (process group, data, loss, model, engine, checkpoint),
one ``train_step``, the loop, the end (final checkpoint and Hugging Face export).

``run_training(cfg)`` is the whole run; ``recall-dist train`` and Ray Train's
``train_loop_per_worker`` both call it (under Ray the process group already exists).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recall_dist.configtree import to_dict
from recall_dist.data.dataset import build_dataset
from recall_dist.data.loader import DistributedBatchIterator
from recall_dist.distributed.collectives import all_reduce_
from recall_dist.train.backends import build_engine
from recall_dist.train.checkpoint import Checkpointer, checkpoint_step, rng_state, set_rng_state
from recall_dist.train.config import TrainConfig, validate_resources
from recall_dist.train.distributed import init_distributed, shutdown
from recall_dist.train.export import export_from_engine
from recall_dist.train.loss_head import CausalLMWithLossHead
from recall_dist.train.metrics import MetricsLogger, combine_micro_stats
from recall_dist.train.models import build_model
from recall_dist.train.preemption import PreemptionWatcher, clear_preempted, mark_preempted


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
    step: int = 0
    skipped_steps: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig, tokenizer, ctx) -> Run:
    seed_everything(cfg.train.seed)
    dataset = build_dataset(cfg.data, tokenizer)
    batches = DistributedBatchIterator(
        dataset,
        cfg.train.micro_batch_size,
        ctx.rank,
        ctx.world_size,
        seed=cfg.train.seed,
        packing=cfg.data.packing,
        max_length=cfg.data.max_length,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    accumulation = cfg.train.accumulation_steps(ctx.world_size)
    total = cfg.train.epochs * len(batches) // accumulation
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps)
    loss = cfg.loss.build()
    model = build_model(cfg.model, gradient_checkpointing=cfg.train.gradient_checkpointing, device_type=ctx.device.type)
    wrapper = CausalLMWithLossHead(model, loss, ctx.dp_group, chunk_size=cfg.loss.chunk_size)
    engine = build_engine(cfg, wrapper, ctx, accumulation, total)
    return Run(cfg, ctx, tokenizer, batches, loss, engine, accumulation, total)


def endless(batches: DistributedBatchIterator):
    """Micro-batches across epochs; the iterator's own state says where it is (resumable)."""
    while True:
        yield from batches


def train_step(run: Run, data) -> dict[str, float]:
    """One optimizer step: ``accumulation_steps`` micro-batches forward/backward, then the update.
    A step with non-finite tokens (the loss already zeroed it on every rank) skips the update."""
    engine, device = run.engine, run.ctx.device
    micro_stats, input_tokens = [], torch.zeros(1, device=device)
    for _ in range(run.accumulation_steps):
        batch = {k: v.to(device) for k, v in next(data).items()}
        input_tokens += (batch["sequence_ids"] >= 0).sum()
        if run.cfg.data.packing:  # attend within each packed example: HF derives it from position_ids
            batch.pop("attention_mask")
        loss, stats = engine.forward(batch)
        engine.backward(loss)
        micro_stats.append(stats)
    stats = combine_micro_stats(micro_stats)
    skip = stats.get("nonfinite_tokens", 0.0) > 0
    stats["lr"] = engine.lr()  # the rate this step's update uses
    grad_norm = engine.step(skip=skip)
    stats.update(skipped=float(skip), input_tokens=float(all_reduce_(input_tokens, "sum", run.ctx.dp_group).item()))
    if grad_norm is not None:
        stats["grad_norm"] = grad_norm
    return stats


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


def resume(run: Run, checkpointer: Checkpointer) -> None:
    path = checkpointer.resolve(run.cfg.train.resume)
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
        print(f"recall-dist train: resumed from {path} at step {run.step}", file=sys.stderr, flush=True)


def run_training(cfg: TrainConfig, on_checkpoint=None) -> dict:
    """Train as ``cfg`` says; returns a summary (final step, last stats, preempted or not, paths).

    ``on_checkpoint(path, step)``, when given, is called on every rank right after each complete
    checkpoint (Ray Train reports it, so that its restore hands restarted workers the right one)."""
    tokenizer = validate_resources(cfg)  # config errors surface before anything is written
    ctx = init_distributed()
    try:
        return _train(cfg, tokenizer, ctx, on_checkpoint)
    finally:
        shutdown(ctx)


def _train(cfg: TrainConfig, tokenizer, ctx, on_checkpoint=None) -> dict:
    run = setup(cfg, tokenizer, ctx)
    out = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(out, ctx.rank, cfg.train.keep_checkpoints)
    resume(run, checkpointer)
    logger = MetricsLogger(out, ctx.is_main, cfg.train.tensorboard, cfg.train.wandb, to_dict(cfg))
    logger.truncate_after(run.step)
    if ctx.is_main:
        clear_preempted(out)
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
    try:
        while run.step < run.total_steps:
            start = time.perf_counter()
            stats = train_step(run, data)
            run.step += 1
            run.skipped_steps += int(stats["skipped"])
            stats.update(
                tokens_per_s=stats["input_tokens"] / (time.perf_counter() - start), skipped_steps=run.skipped_steps
            )
            if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
                logger.log(run.step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
            if cfg.train.checkpoint_every and run.step % cfg.train.checkpoint_every == 0:
                path = save_checkpoint(run, checkpointer)
                saved_at = run.step
                if on_checkpoint is not None:
                    on_checkpoint(path, run.step)
            if run.step < run.total_steps and watcher.should_stop():
                preempted = True
                break
        if saved_at != run.step:
            path = save_checkpoint(run, checkpointer)
            if on_checkpoint is not None:
                on_checkpoint(path, run.step)
        if preempted:
            if ctx.is_main:
                mark_preempted(out, run.step)
        elif cfg.train.export_final:
            export_from_engine(run.engine, tokenizer, out / "final", ctx.rank)
        # Leave together: a rank that tears down its gloo group while another still writes the
        # export was seen to abort at exit ("terminate called without an active exception").
        # Success path only: after an exception a barrier could wait forever on a dead peer.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    finally:
        bar.close()
        watcher.close()
        logger.close()
    return {
        "step": run.step,
        "total_steps": run.total_steps,
        "preempted": preempted,
        "skipped_steps": run.skipped_steps,
        "last": stats,
        "output_dir": str(out),
        "final_dir": None if preempted or not cfg.train.export_final else str(out / "final"),
    }
