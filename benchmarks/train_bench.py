"""CPU training throughput of the tiny Llama: nll vs cdiv under each backend (DeepSpeed ZeRO-2,
ZeRO-3, FSDP2), one process, measured in the same run and interleaved (round-robin over the
configurations, best round kept, as ``timeit`` does) so that load from other processes hits every
row alike and the table reports what the code can do.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/train_bench.py [--steps 20 --rounds 5 --hidden 128]

Prints a table: tokens/s per (backend, loss) and the cdiv/nll ratio per backend.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated c10d calls, every step
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BACKENDS = {
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "fsdp2": {"name": "fsdp2"},
}
LOSSES = {"nll": {"name": "nll", "params": {}}, "cdiv": {"name": "cdiv", "params": {"alpha": 1.4}}}


def config(backend: dict, loss: dict, args, out: str):
    from recall_dist.configtree import load_yaml
    from recall_dist.train.config import MODEL_PRESET_DIR, train_config_from_dict

    model = load_yaml(MODEL_PRESET_DIR / "tiny-llama.yaml")
    model["config"].update(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers)
    return train_config_from_dict(
        {
            "model": model,
            "loss": copy.deepcopy(loss),
            "backend": backend,
            "data": {"source": "synthetic:product", "task_params": {"max_factor": 30}, "num_samples": 20000},
            "optim": {"lr": 1e-3},
            "train": {
                "micro_batch_size": args.micro_batch_size,
                "output_dir": out,
                "progress_bar": False,
                "export_final": False,
                "max_steps": 10**6,
            },
        }
    ).with_environment()  # the RECALL_DIST_* kernel variables, read once as run_training reads them


def measure(run, data, steps: int, warmup: int) -> float:
    from recall_dist.train.trainer import train_step

    for _ in range(warmup):
        train_step(run, data)
    tokens, start = 0.0, time.perf_counter()
    for _ in range(steps):
        tokens += train_step(run, data)["input_tokens"]
    return tokens / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=64)
    args = p.parse_args()
    import torch

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup

    torch.set_num_threads(1)
    ctx = init_distributed()
    runs, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for b_name, backend in BACKENDS.items():
            for l_name, loss in LOSSES.items():
                cfg = config(backend, loss, args, tmp)
                run = setup(cfg, validate_resources(cfg), ctx)
                runs[b_name, l_name], results[b_name, l_name] = (run, endless(run.batches)), []
        for _ in range(args.rounds):
            for key, (run, data) in runs.items():
                results[key].append(measure(run, data, args.steps, args.warmup))
    print(
        f"tiny Llama hidden={args.hidden} layers={args.layers}, micro-batch {args.micro_batch_size}, 1 CPU "
        f"process, 1 thread, {args.steps} steps x {args.rounds} rounds (best)"
    )
    print(f"{'backend':<8}{'nll tok/s':>12}{'cdiv tok/s':>12}{'cdiv/nll':>10}")
    for b_name in BACKENDS:
        nll, cdiv = (max(results[b_name, loss]) for loss in LOSSES)
        print(f"{b_name:<8}{nll:>12.0f}{cdiv:>12.0f}{cdiv / nll:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
