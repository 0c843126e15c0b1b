"""Resume a DeepSpeed ZeRO checkpoint on a different number of ranks, through DeepSpeed's universal
checkpoint: the per-rank optimizer partitions are converted once (``ds_to_universal``, on rank 0) into one
file per parameter (fp32 master and Adam moments), which any number of ranks can re-partition on load.

The converted copy goes to ``<checkpoints>/.universal-<step dir>/`` beside the checkpoint (never inside it:
the checkpoint itself stays byte-identical and verifiable), and is reused if a conversion completed before.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from recall_dist.log import get_logger

log = get_logger("train")

TAG = "engine"  # DeepSpeedEngine.save uses this tag: <engine dir>/engine/<files>
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_DONE = "CONVERTED"


def saved_dp_size(engine_dir: str | Path) -> int | None:
    """The data-parallel size a ZeRO checkpoint was written with (one optimizer partition per rank)."""
    tag_dir = Path(engine_dir) / TAG
    if not tag_dir.is_dir():
        return None
    ranks = {int(m.group(1)) for p in tag_dir.iterdir() if (m := _OPTIM_FILE.match(p.name))}
    return len(ranks) or None


def universal_dir(engine_dir: str | Path) -> Path:
    step_dir = Path(engine_dir).resolve().parent
    return step_dir.parent / f".universal-{step_dir.name}"


def convert_to_universal(engine_dir: str | Path) -> Path:
    """Run DeepSpeed's ``ds_to_universal`` on ``<engine_dir>/engine`` (one process).  Returns the directory
    holding the universal checkpoint under the same tag."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(engine_dir)
    if (out / _DONE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted conversion
    args = argparse.Namespace(
        input_folder=str(Path(engine_dir) / TAG),
        output_folder=str(out / TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints carry no Megatron-style universal info: add the default
    )
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the converter prints progress; keep our stdout clean
    try:
        ds_to_universal.main(args)
    finally:
        sys.stdout = stdout
    (out / TAG / "latest_universal").write_text(TAG)
    (out / _DONE).write_text("ok\n")
    return out


def load_other_world_size(ds_engine, engine_dir: str | Path, saved: int, current: int) -> None:
    """Load a ZeRO checkpoint saved by ``saved`` ranks into an engine of ``current`` ranks."""
    if dist.get_rank() == 0:
        log.info(
            "the checkpoint in %s was written by %d data-parallel ranks, this run has %d: converting it to a "
            "DeepSpeed universal checkpoint and re-partitioning",
            engine_dir,
            saved,
            current,
        )
        convert_to_universal(engine_dir)
    dist.barrier()
    ds_engine._config.load_universal_checkpoint = True
    try:
        path, _ = ds_engine.load_checkpoint(
            str(universal_dir(engine_dir)), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        ds_engine._config.load_universal_checkpoint = False
    if path is None:
        raise FileNotFoundError(f"no universal DeepSpeed checkpoint under {universal_dir(engine_dir)}")
