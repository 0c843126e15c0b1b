"""How long `make demo-lm`'s fine-tunes must take on this machine at the very least: the arithmetic floor
of one seed's training, from this CPU's measured matmul rate, and one real forward + backward to compare.

One seed of the demo fine-tunes ``--steps`` in all (default 5 x 56 + 2 x 112 = 504: the five losses at 56
steps, the recipe's finalist and its NLL reference at 112; ``demo/iso.py ISO_LOSSES``), each step 16 chat
examples.  A training token costs at least ``6 x (non-embedding parameters)`` FLOPs (forward 2, backward 4;
the tied head only runs on the few labelled tokens, and attention over ~50 tokens is small, so both are
left out: the floor stays a lower bound).  The tokens per example are counted without padding from the
demo's own training file (``results/demo-lm/data/train.jsonl`` after a run, or ``--data``), through the
chat template as training tokenizes it.  The rate: a 2048 x 2048 fp32 matmul on one thread, the best of
``--rounds``, times the number of cores (the demo's two ranks use one each).  Nothing else counts toward
the floor: no optimizer, no communication, no sweep.

The real step: one forward + backward of ``--micro`` such examples (one rank's share of a step) on one
thread, median of ``--rounds``; its ratio to the floor says how far a step is from the matmul rate.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/demo_lm_floor.py [--data results/demo-lm/data/train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.convert import convert_known
    from recall_dist.data import load_tokenizer
    from recall_dist.data.chat import tokenize_messages

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="results/demo-lm/data/train.jsonl", help="the demo's training file")
    p.add_argument("--model", default=None, help="model directory (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=5 * 56 + 2 * 112, help="fine-tuning steps of one seed, all runs")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--micro", type=int, default=8, help="examples per rank and step")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (run `make demo-lm` once, or pass a demo's data/train.jsonl)")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append(5 * 2 * 2048**3 / (time.perf_counter() - start))
    rate = max(rates)

    path = Path(args.model) if args.model else convert_known()
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    embedding = model.get_input_embeddings().weight.numel()
    body = sum(q.numel() for q in model.parameters()) - embedding  # tied: the head is the embedding
    with open(args.data, encoding="utf-8") as f:
        examples = [tokenize_messages(json.loads(line)["messages"], tokenizer) for line in f]
    tokens = [len(e["input_ids"]) for e in examples]
    per_example = statistics.mean(tokens)
    step_flops = 6 * body * per_example * args.batch
    floor = args.steps * step_flops / (rate * args.cores)

    # One rank's real forward + backward on the first --micro examples, padded as a micro-batch is.
    batch = examples[: args.micro]
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in batch])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden.pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    real = statistics.median(times)
    real_floor = 6 * body * int(mask.sum()) / rate

    print(f"{path.name}: {body / 1e6:.1f} M non-embedding parameters, vocabulary {model.config.vocab_size}")
    print(f"matmul rate, 1 thread, 2048^2 fp32: {rate / 1e9:.1f} GFLOP/s (best of {args.rounds}); {args.cores} cores")
    print(f"{args.data}: {len(tokens)} examples, {per_example:.1f} tokens each (min {min(tokens)}, max {max(tokens)})")
    print(f"one step of {args.batch}: >= {step_flops / 1e9:.0f} GFLOP, >= {step_flops / (rate * args.cores):.2f} s")
    print(f"one seed, {args.steps} steps: >= {floor / 60:.1f} min of fine-tuning alone")
    print(
        f"real forward + backward, {args.micro} examples ({int(mask.sum())} tokens, padded to {width}), 1 thread: "
        f"median {real:.2f} s, {real / real_floor:.2f}x its floor of {real_floor:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
