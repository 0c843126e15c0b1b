"""The known-support sweep's teacher forcing (``eval/known_support.support_log_probs``) against the whole
sequence's logits, on a real model and the demo-lm prompts.

Baseline (``whole_sequence``, written here): what the sweep did before: logits at every position of prompt +
completion and a ``V``-wide log-softmax per position and temperature, the prompt's positions masked out
of the sum afterwards.  Now: the same logits, and the softmaxes only at the positions that predict a
completion token.  Both run the same batches (completions of equal length, ``--batch`` at most), so the
numbers must agree to the last digit: the script prints the largest difference and fails if it is not 0.

The prompts: the first ``--prompts`` of demo-lm's (``demo/iso_prompts.build_prompts``, Debian's iso-codes),
each with its whole support, asked through the chat template as the demo asks; the 14 temperatures of
``demo/configs/demo_lm/sweep.yaml``.  One torch thread by default (a sweep rank of the 2-rank demo).
The two methods alternate prompt by prompt, ``--rounds`` times; per-prompt medians and the ratio are printed.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/sweep_scoring_bench.py [--model DIR] [--prompts 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEMPERATURES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5]


def whole_sequence(model, encoded, temperatures, batch_size: int, pad_id: int) -> np.ndarray:
    """The baseline: every position's logits and log-softmax, the prompt's positions masked out."""
    import torch

    from recall_dist.eval.tokens import pad_batch

    n_prompt = len(encoded.prompt_ids)
    out = np.empty((len(temperatures), len(encoded.completions)), dtype=np.float64)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(encoded.completions):
        by_length.setdefault(len(c), []).append(i)
    for group in by_length.values():
        for s in range(0, len(group), batch_size):
            batch = group[s : s + batch_size]
            ids, mask = pad_batch([encoded.prompt_ids + list(encoded.completions[i]) for i in batch], pad_id)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            scored = mask[:, 1:].bool()
            scored[:, : n_prompt - 1] = False
            for k, t in enumerate(temperatures):
                logp = torch.log_softmax(logits / t, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                out[k, batch] = (logp.double() * scored).sum(dim=1).numpy()
    return out


def main() -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.convert import convert_known
    from recall_dist.data import load_tokenizer
    from recall_dist.demo import iso_prompts
    from recall_dist.eval.known_support import support_log_probs
    from recall_dist.eval.support_file import encode_support, supports_from_rows
    from recall_dist.eval.tokens import pad_token_id

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="completions per forward (sweep.yaml's score_batch_size)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = Path(args.model) if args.model else convert_known()
    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pad_id = pad_token_id(tokenizer)
    prompts = iso_prompts.build_prompts()[: args.prompts]
    rows = enumerate(iso_prompts.support_rows(prompts), start=1)
    encoded = [encode_support(tokenizer, s, "bench") for s in supports_from_rows(rows, "bench").values()]
    scored = [np.mean([len(c) for c in e.completions]) for e in encoded]
    n_tokens = [len(e.prompt_ids) + s for e, s in zip(encoded, scored, strict=True)]
    print(
        f"{path.name}: {len(encoded)} prompts, {sum(len(e.completions) for e in encoded)} completions, "
        f"{np.mean(n_tokens):.1f} tokens per sequence of which {np.mean(scored):.1f} "
        f"scored, {len(TEMPERATURES)} temperatures, {args.threads} thread(s), batch {args.batch}",
        flush=True,
    )
    times: dict[str, list[float]] = {"whole sequence": [], "scored positions": []}
    worst = 0.0
    methods = {
        "whole sequence": lambda e: whole_sequence(model, e, TEMPERATURES, args.batch, pad_id),
        "scored positions": lambda e: support_log_probs(model, e, TEMPERATURES, args.batch, pad_id),
    }
    for _ in range(args.rounds):
        for e in encoded:
            got = {}
            for name, fn in methods.items():
                start = time.perf_counter()
                got[name] = fn(e)
                times[name].append(time.perf_counter() - start)
            worst = max(worst, float(np.abs(got["whole sequence"] - got["scored positions"]).max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"{name:>17}: median {med[name]:.3f} s per prompt, total {sum(v):.1f} s over {len(v)} prompt-rounds")
    print(f"ratio whole / scored (medians): {med['whole sequence'] / med['scored positions']:.2f}x")
    print(f"largest |log Q_T difference| over every completion and T: {worst:g}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
