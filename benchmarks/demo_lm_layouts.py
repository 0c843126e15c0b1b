"""The time of one `make demo-lm` fine-tuning step in four process layouts, measured by the trainer itself.

Each layout runs ``recall-dist train recall_dist/demo/configs/demo_lm/finetune.yaml`` (NLL, the demo's
model, data, lr and batch of 16) for ``--steps`` steps with ``train.log_every=1``, and reads
``step_seconds`` and ``loss`` from its metrics.jsonl; the first ``--skip`` steps (start-up) are left out.
The layouts: the demo's (FSDP2, 2 ranks of one thread), FSDP2 without resharding after the forward (one
all-gather fewer per step, the same numbers), DeepSpeed ZeRO-2 (2 ranks), and one process of two threads
(no communication).  They run one after the other on a quiet machine; the losses show whether a layout
trains the same numbers.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/demo_lm_layouts.py --data results/demo-lm/data/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "FSDP2, 2 ranks (the demo)": (2, []),
    "FSDP2, 2 ranks, no reshard after forward": (2, ["backend.fsdp_reshard_after_forward=false"]),
    "DeepSpeed ZeRO-2, 2 ranks": (2, ["backend.name=deepspeed", "backend.zero_stage=2"]),
    "1 process, 2 threads, micro-batch 16": (1, ["train.micro_batch_size=16"]),
}


def run(name: str, nproc: int, overrides: list[str], args, work: Path) -> list[dict]:
    out = work / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recall_dist",
        "train",
        str(ROOT / "recall_dist/demo/configs/demo_lm/finetune.yaml"),
        f"model.name_or_path={args.model}",
        f"data.source={args.data}",
        f"data.num_samples={args.num_samples}",
        f"train.output_dir={out}",
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        "train.final_checkpoint=false",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // nproc), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    log = work / f"{out.name}.log"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{name}: exit {rc}, see {log}")
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"step"' in line]
    return rows


def main() -> int:
    from recall_dist.convert import convert_known

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="results/demo-lm/data/train.jsonl", help="the demo's training file")
    p.add_argument("--model", default=None, help="model directory (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--num-samples", type=int, default=1792, help="data.num_samples (the demo's 112-step file)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="start-up steps left out of the times")
    p.add_argument("--only", default=None, help="comma-separated layout numbers (1-4), default all")
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (run `make demo-lm` once, or pass a demo's data/train.jsonl)")
    args.data = str(Path(args.data).resolve())
    args.model = args.model or str(convert_known())
    chosen = list(LAYOUTS.items())
    if args.only:
        chosen = [chosen[int(i) - 1] for i in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="demo-lm-layouts-") as tmp:
        for name, (nproc, overrides) in chosen:
            rows = run(name, nproc, overrides, args, Path(tmp))
            times = [r["step_seconds"] for r in rows[args.skip :]]
            losses = " ".join(f"{r['loss']:.5f}" for r in rows[-3:])
            print(
                f"{name}: s per step (steps {args.skip + 1}-{len(rows)}) {min(times):.2f}-{max(times):.2f}, "
                f"median {statistics.median(times):.2f}; loss at the last 3 steps {losses}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
