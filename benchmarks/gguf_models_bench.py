"""The offline GGUF models side by side (``recall_dist/gguf_models.py``): conversion time (GGUF file ->
Hugging Face directory, ``recall-dist convert-gguf --model NAME``, into a fresh directory, so nothing is
reused), parameter count, vocabulary, and the time of one chat example's forward pass on CPU (the
fortune-cookie turn of tests/test_convert.py through training's tokenization).  The forwards of all
models are interleaved, ``--rounds`` each after a warm-up, with ``--threads`` torch threads (1 by
default: on a shared 2-core machine more threads mostly wait for each other); min and median reported.
Conversion is given as wall-clock and the process's CPU time (the steadier one on a loaded machine).

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/gguf_models_bench.py [--models a,b] [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MESSAGES = [
    {"role": "system", "content": "You write fortune cookies."},
    {"role": "user", "content": "Tell me a fortune."},
    {"role": "assistant", "content": "A journey of a thousand miles begins with a single step."},
]


def convert(name: str, out: Path) -> dict:
    """Convert ``name`` into ``out`` (float32), timed; then its model and one tokenized example."""
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.convert import convert_gguf
    from recall_dist.data import load_tokenizer
    from recall_dist.data.chat import tokenize_messages
    from recall_dist.gguf_models import known_model, model_gguf

    entry = known_model(name)
    gguf = model_gguf(entry)  # assembled (chunked models) before the clock starts: a one-time copy
    start, cpu = time.perf_counter(), time.process_time()
    convert_gguf(gguf, out, "float32", entry)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenize_messages(MESSAGES, load_tokenizer(str(out)))["input_ids"]])
    params = sum(p.numel() for p in model.parameters())
    return {"model": model, "ids": ids, "gguf": gguf.stat().st_size, "params": params, "wall": wall, "cpu": cpu}


def main() -> int:
    import torch

    from recall_dist.gguf_models import KNOWN_MODELS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(KNOWN_MODELS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: convert(name, Path(tmp) / name) for name in args.models.split(",")}
    torch.set_num_threads(args.threads)
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run["model"](input_ids=run["ids"])  # warm-up
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run["model"](input_ids=run["ids"])
                times[name].append(time.perf_counter() - start)
    print(f"1-minute load average at the start: {load:.1f}; forward: {args.threads} thread(s), {args.rounds} rounds")
    print("| model | GGUF MB | params (M) | vocab | convert wall/CPU (s) | tokens | forward min/median (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['gguf'] / 1e6:.0f} | {run['params'] / 1e6:.1f} | {run['model'].config.vocab_size} | "
            f"{run['wall']:.1f} / {run['cpu']:.1f} | {run['ids'].shape[1]} | "
            f"{min(times[name]):.3f} / {statistics.median(times[name]):.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
