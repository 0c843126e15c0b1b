"""Fine-tuning step time on a real model (the demo-text setting): our trainer's step (FSDP2 engine, fused
loss head, bf16 compute over fp32 master weights, loss nll and cdiv) against a plain PyTorch loop on the
same model and the same batches (fp32 weights, ``torch.autocast`` bf16, full logits +
``F.cross_entropy``, Adam), one process, interleaved rounds, best kept.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/text_train_bench.py [--model DIR] [--micro-batch-size 16]
        [--steps 3] [--rounds 2] [--threads 2]

Default model: SmolLM2-135M-Instruct converted by ``recall-dist convert-gguf`` (cached); batches: the
demo-text chat examples of Debian's fortunes (``recall_dist/demo/fortunes.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def our_config(model: str, data: str, loss: str, args, out: str):
    from recall_dist.train.config import train_config_from_dict

    return train_config_from_dict(
        {
            "model": {"name_or_path": model, "dtype": "bfloat16", "attn_implementation": "sdpa"},
            "data": {"source": data, "max_length": 96, "truncation": "drop"},
            "loss": {"name": loss, "params": {"alpha": 1.4} if loss == "cdiv" else {}},
            "optim": {"name": "adam", "lr": 1e-5},
            "backend": {"name": "fsdp2"},
            "train": {
                "micro_batch_size": args.micro_batch_size,
                "output_dir": out,
                "progress_bar": False,
                "export_final": False,
                "max_steps": 10**6,
            },
        }
    ).with_environment()  # the RECALL_DIST_* kernel variables, read once as run_training reads them


def plain_step(model, optimizer, batch) -> float:
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target, ignore_index=-100)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(batch["attention_mask"].sum())


def timed(step, batches, steps: int) -> float:
    """Input tokens per second over ``steps`` steps (after one warm-up step)."""
    step(next(batches))
    tokens, start = 0.0, time.perf_counter()
    for _ in range(steps):
        tokens += step(next(batches))
    return tokens / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.data import DistributedBatchIterator, build_dataset
    from recall_dist.demo.fortunes import read_fortunes, write_corpus
    from recall_dist.demo.pipeline import prepare_model
    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    torch.set_num_threads(args.threads)
    args.model = prepare_model(args.model)  # default: SmolLM2 converted from GGUF (cached)
    ctx = init_distributed()
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        train, *_ = write_corpus(Path(tmp) / "data", read_fortunes())
        runs = {}
        for loss in ("nll", "cdiv"):
            cfg = our_config(args.model, str(train), loss, args, str(Path(tmp) / loss))
            run = setup(cfg, validate_resources(cfg), ctx)
            runs[f"ours {loss}"] = (run, endless(run.batches))
        plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        plain.config.use_cache = False
        optimizer = torch.optim.Adam(plain.parameters(), lr=1e-5)
        # The same batches as our runs: the same dataset, batch iterator and seed.
        cfg = our_config(args.model, str(train), "nll", args, tmp)
        tokenizer = validate_resources(cfg)
        loader = DistributedBatchIterator(
            build_dataset(cfg.data, tokenizer),
            args.micro_batch_size,
            seed=cfg.train.seed,
            pad_token_id=tokenizer.pad_token_id,
        )
        plain_batches = endless(loader)
        for _ in range(args.rounds):
            for name, (run, data) in runs.items():
                rates.setdefault(name, []).append(
                    timed(lambda d, run=run: train_step(run, iter([d]))["input_tokens"], data, args.steps)
                )
            rates.setdefault("plain F.cross_entropy", []).append(
                timed(lambda b: plain_step(plain, optimizer, b), plain_batches, args.steps)
            )
    best = {name: max(r) for name, r in rates.items()}
    print(
        f"{Path(args.model).name}: micro-batch {args.micro_batch_size} chat examples, 1 process, {args.threads} "
        f"threads, {args.steps} steps x {args.rounds} rounds (best), bf16 compute"
    )
    print(f"{'step':<24}{'tokens/s':>10}{'time / plain':>14}")
    for name, rate in best.items():
        print(f"{name:<24}{rate:>10.1f}{best['plain F.cross_entropy'] / rate:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
