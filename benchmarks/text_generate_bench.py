"""Generation throughput of the text sweep on a real model: ``eval.generate.sample_rows`` (every
temperature of a chunk of prompts in one KV-cache decode loop, one shared prefill per distinct prompt,
stopped rows leaving the batch) against plain ``model.generate`` (one call per temperature, the same
rows, ``do_sample=True, top_k=0, top_p=1``), interleaved rounds, best kept.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/text_generate_bench.py [--model DIR] [--rows 100]
        [--temperatures 0.6,0.8,1.0,1.2,1.4,1.6] [--max-new-tokens 48] [--dtype bfloat16] [--rounds 2]

Default model: SmolLM2-135M-Instruct converted by ``recall-dist convert-gguf`` (cached), the demo-text
prompt.  Tokens counted: generated tokens up to and including each row's stop token (what a sweep
uses), so both methods are charged for the same useful work; ``generate`` also decodes the finished
rows of its batch (padding) until the longest row ends, which is part of what it costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def useful_tokens(rows: list[list[int]], stops: set[int]) -> int:
    total = 0
    for ids in rows:
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids) - 1)
        total += end + 1
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=int, default=100, help="prompts (rows) per temperature")
    p.add_argument("--temperatures", default="0.6,0.8,1.0,1.2,1.4,1.6")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.constants import DTYPES
    from recall_dist.data import load_tokenizer
    from recall_dist.demo.fortunes import PROMPT, SYSTEM
    from recall_dist.demo.pipeline import prepare_model
    from recall_dist.eval.generate import SampleRow, sample_rows, stop_token_ids
    from recall_dist.eval.tokens import pad_token_id, prompt_ids

    torch.set_num_threads(args.threads)
    args.model = prepare_model(args.model)  # default: SmolLM2 converted from GGUF (cached)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    tokenizer = load_tokenizer(args.model)
    temps = [float(t) for t in args.temperatures.split(",")]
    head = prompt_ids(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}])
    stops, pad = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    n = args.max_new_tokens

    def ours() -> int:
        rows = [SampleRow(tuple(head), t, 1000 * k + i) for k, t in enumerate(temps) for i in range(args.rows)]
        return useful_tokens(sample_rows(model, rows, n, stops, pad, batch_rows=len(rows)), stops)

    def plain() -> int:
        ids = torch.tensor([head] * args.rows)
        total = 0
        for k, t in enumerate(temps):
            torch.manual_seed(k)
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=t,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=n,
                    pad_token_id=pad,
                    eos_token_id=sorted(stops),
                )
            total += useful_tokens(out[:, len(head) :].tolist(), stops)
        return total

    best = {"sample_rows (all T batched)": 0.0, "model.generate (per T)": 0.0}
    for _ in range(args.rounds):
        for name, fn in (("sample_rows (all T batched)", ours), ("model.generate (per T)", plain)):
            start = time.perf_counter()
            tokens = fn()
            best[name] = max(best[name], tokens / (time.perf_counter() - start))
    print(
        f"{Path(args.model).name}, {args.dtype}, {args.threads} threads: {args.rows} rows x {len(temps)} "
        f"temperatures, <= {n} new tokens, {args.rounds} rounds (best)"
    )
    print(f"{'method':<30}{'tokens/s':>10}")
    for name, rate in best.items():
        print(f"{name:<30}{rate:>10.1f}")
    ratio = best["sample_rows (all T batched)"] / best["model.generate (per T)"]
    print(f"ratio sample_rows / generate: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
