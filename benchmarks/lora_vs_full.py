"""LoRA vs full fine-tuning of the demo-text model through the real ``recall-dist train``: step time, peak
memory per rank and optimizer-state bytes per rank, as ratios measured in one run.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/lora_vs_full.py [--model DIR] [--steps 10] [--rounds 2]
        [--loss nll] [--keep DIR]

Every run is ``torchrun --nproc-per-node 2 -m recall_dist train recall_dist/demo/configs/demo_text/finetune.yaml``
(FSDP2, bf16 compute where the CPU has it, 32 fortunes per step: demo-text's fine-tune) on the demo's corpus;
the LoRA runs add ``configs/demo_text/lora.yaml`` (what ``recall-dist demo-text --lora`` adds: r 16 on every
linear layer, lr 2e-4).  Full and LoRA runs alternate, ``--rounds`` times each; for each number the best
round is kept.
- step time: the median ``step_seconds`` of the run's ``metrics.jsonl`` after its first 2 steps (warm-up);
- peak RSS per rank: the largest resident set of the run's processes (``wait4`` on the launcher: its own and its
  reaped children's maximum, i.e. the larger rank), Python and torch included;
- optimizer state per rank: the bytes of every Adam ``exp_avg`` / ``exp_avg_sq`` tensor of the run's last
  checkpoint (its DCP metadata), divided by the 2 ranks FSDP2 shards them over; the model tensors that checkpoint
  holds likewise (the trainable parameters, plus whatever frozen tensor the backend saves).

Default model: SmolLM2-135M-Instruct converted by ``recall-dist convert-gguf`` (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP_STEPS = 2
RANKS = 2


def run_train(overrides: list[str], log: Path) -> tuple[int, float, int]:
    """``recall-dist train`` of the demo-text fine-tune config on 2 processes, as demo-text runs it; returns
    (exit code, wall seconds, peak RSS in bytes of the largest of its processes)."""
    from recall_dist.demo.fortunes import CONFIG_DIR
    from recall_dist.demo.stages import PACKAGE_PARENT, torchrun

    cmd = torchrun("-m", "recall_dist", "train", str(CONFIG_DIR / "finetune.yaml"), *overrides)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PACKAGE_PARENT))
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=PACKAGE_PARENT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the launcher's rusage covers the ranks it reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - start, usage.ru_maxrss * 1024  # Linux: KiB


def step_seconds(run_dir: Path) -> float:
    """The median step time of ``run_dir``'s metrics after the warm-up steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in rows if "step_seconds" in r and r.get("step", 0) > WARMUP_STEPS]
    return statistics.median(times)


def checkpoint_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes of the optimizer state and of the trained (saved) parameters in ``run_dir``'s last checkpoint,
    over all ranks, from its DCP metadata (global tensor shapes and dtypes)."""
    import math

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from recall_dist.train.rundir.checkpointer import latest_checkpoint

    newest = latest_checkpoint(run_dir / "checkpoints")
    metadata_dirs = [d for d in [newest, *newest.iterdir()] if d.is_dir() and (d / ".metadata").is_file()]
    sizes = {"optimizer state": 0, "saved parameters": 0}
    for directory in metadata_dirs:
        for key, meta in FileSystemReader(str(directory)).read_metadata().state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                continue
            nbytes = math.prod(meta.size) * meta.properties.dtype.itemsize
            if ".state." in f".{key}" and key.split(".")[-1] in ("exp_avg", "exp_avg_sq"):
                sizes["optimizer state"] += nbytes
            elif key.startswith("model."):
                sizes["saved parameters"] += nbytes
    return sizes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--loss", default="nll")
    p.add_argument("--keep", default=None, help="keep the runs in this directory (default: a temporary one)")
    args = p.parse_args()
    from recall_dist.demo.fortunes import CONFIG_DIR, read_fortunes, write_corpus
    from recall_dist.demo.pipeline import LORA_CONFIG, config_overrides, prepare_model

    model = prepare_model(args.model)
    variants = {"full": [], "lora": config_overrides(CONFIG_DIR / LORA_CONFIG)}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        train, *_ = write_corpus(root / "data", read_fortunes())
        for round_ in range(args.rounds):
            for name, extra in variants.items():
                run_dir = root / f"{name}-{round_}"
                overrides = [
                    f"model.name_or_path={model}",
                    f"data.source={train}",
                    f"loss.name={args.loss}",
                    f"train.output_dir={run_dir}",
                    f"train.max_steps={args.steps}",
                    f"data.num_samples={args.steps * 32}",
                    "train.log_every=1",
                    "train.export_final=false",
                    "train.progress_bar=false",
                    *extra,
                ]
                code, wall, rss = run_train(overrides, root / f"{name}-{round_}.log")
                if code != 0:
                    print(f"{name} round {round_}: exit code {code}; log {root / f'{name}-{round_}.log'}")
                    return 1
                results[name].append(
                    {"step": step_seconds(run_dir), "rss": rss, "wall": wall, **checkpoint_bytes(run_dir)}
                )
                print(f"{name} round {round_}: {results[name][-1]}", flush=True)
    best = {
        name: {
            "step": min(r["step"] for r in rs),
            "rss": min(r["rss"] for r in rs),
            "optimizer state": rs[0]["optimizer state"] / RANKS,
            "saved parameters": rs[0]["saved parameters"] / RANKS,
        }
        for name, rs in results.items()
    }
    print(
        f"\n{Path(model).name}: {args.loss}, 2 processes (FSDP2), 32 examples per step, {args.steps} steps "
        f"(median after {WARMUP_STEPS}) x {args.rounds} rounds (best); LoRA: {' '.join(variants['lora'])}"
    )
    print(f"{'per rank':<38}{'full':>12}{'lora':>12}{'lora / full':>13}")
    rows = [
        ("step time (s)", "step", 1.0, ".2f"),
        ("peak RSS (MiB)", "rss", 2**20, ".0f"),
        ("optimizer state, Adam m+v (MiB)", "optimizer state", 2**20, ".2f"),
        ("model tensors in the checkpoint (MiB)", "saved parameters", 2**20, ".2f"),
    ]
    for label, key, unit, fmt in rows:
        full, lora = best["full"][key] / unit, best["lora"][key] / unit
        print(f"{label:<38}{full:>12{fmt}}{lora:>12{fmt}}{lora / full:>13.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
