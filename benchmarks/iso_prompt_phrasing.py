"""How much of the un-fine-tuned model's mass falls on the valid answers of the known-support demo's
prompts (``recall_dist/demo/iso_prompts.py``), for each phrasing of ``PHRASINGS``: the starting
Precision at T = 1, i.e. how much room the fine-tune has, and which phrasing the demo uses.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/iso_prompt_phrasing.py [--model DIR] [--iso-dir DIR]

For each prompt and phrasing: valid mass = sum over the support of Q(answer + end-of-turn | chat
prompt), teacher-forced with plain transformers (float32) on exactly the tokens training scores
(``data/chat.py``'s ``tokenize_messages``: the assistant turn's content and its end-of-turn token,
rendered by the model's chat template).  Default model: SmolLM2-135M-Instruct converted from GGUF
(``recall-dist convert-gguf``, cached).

Measured 2026-12-06 (SmolLM2-135M-Instruct converted from GGUF, float32, CPU; iso-codes 4.15), valid
mass at T = 1, i.e. the un-fine-tuned model's exact Precision on each prompt:

    prompt                                                        |S|     plain    suffix    system
    Name a region of France.                                       26  3.23e-07  4.06e-05  2.27e-06
    Name a region of Germany.                                      16  5.44e-06  8.30e-04  2.15e-05
    Name a region of Japan.                                        47  9.88e-07  1.03e-04  5.41e-06
    Name a region of the United States.                            57  1.82e-04  4.55e-03  1.66e-03
    Name a currency called the dollar.                             23  1.63e-05  9.84e-05  3.90e-05
    Name a language whose name starts with the letter K.           33  4.83e-06  4.20e-05  1.31e-05
    Name a writing system whose name starts with the letter L.     11  9.07e-07  7.25e-06  9.44e-06
    mean                                                               3.01e-05  8.10e-04  2.51e-04
    geometric mean                                                     4.19e-06  1.25e-04  2.15e-05

The suffix " Answer with the name only." has the highest valid mass on 6 of the 7 prompts (30x plain,
6x the system message, geometric means), so it is the demo's ``PHRASING``.  Whatever the phrasing, the
model almost never replies with a bare name: its greedy replies are sentences ("The region of France is
France.", "The dollar is a currency called the US Dollar."), so the starting Precision is ~1e-3 or less
and the whole range is left to the fine-tune, which has to teach the reply's form as well as the names.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = (
    "Name a region of France.",
    "Name a region of Germany.",
    "Name a region of Japan.",
    "Name a region of the United States.",
    "Name a currency called the dollar.",
    "Name a language whose name starts with the letter K.",
    "Name a writing system whose name starts with the letter L.",
)


def answer_log_probs(model, tokenizer, messages: list[dict], answers: tuple[str, ...], batch: int = 16) -> list[float]:
    """log Q(answer + end-of-turn | messages) for each answer: the sum of the model's log-probabilities
    on the tokens ``tokenize_messages`` labels (the last assistant turn), in float64."""
    import torch

    from recall_dist.constants import IGNORE_INDEX
    from recall_dist.data.chat import tokenize_messages

    rows = [
        tokenize_messages([*messages, {"role": "assistant", "content": a}], tokenizer, assistant_turns="last")
        for a in answers
    ]
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in chunk])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in chunk])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]  # position j predicts token j + 1
        scored = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits[scored], dim=-1).gather(-1, targets[scored][:, None])[:, 0]  # scored only
        row = scored.nonzero()[:, 0]
        out += torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, row, logp.double()).tolist()
    return out


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 24) -> str:
    """The model's greedy reply to ``messages`` (what it says when asked), up to its end of turn."""
    import torch

    from recall_dist.data.chat import render

    ids = tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="causal LM directory (default: SmolLM2-135M-Instruct, converted)")
    p.add_argument("--iso-dir", default=None, help="iso-codes JSON directory (default: /usr/share/iso-codes/json)")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_dist.convert import convert_gguf, default_output_dir, smollm2_gguf
    from recall_dist.demo.iso_prompts import ISO_DIR, PHRASINGS, build_prompts, is_heldout, prompt_messages

    path = args.model or str(convert_gguf(smollm2_gguf(), default_output_dir()))  # cached after the first call
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    prompts = {q.text: q for q in build_prompts(args.iso_dir or ISO_DIR)}
    chosen = [prompts[t] for t in PROMPTS if t in prompts]
    print(f"model {path}; {len(chosen)} prompts; valid mass = sum over the support of Q(answer + end-of-turn)")
    print(f"{'prompt':62s} {'|S|':>4s}  " + "  ".join(f"{name:>8s}" for name in PHRASINGS))
    logs, means = dict.fromkeys(PHRASINGS, 0.0), dict.fromkeys(PHRASINGS, 0.0)
    replies = []
    for q in chosen:
        masses = []
        for name, phrasing in PHRASINGS.items():
            logps = answer_log_probs(model, tokenizer, prompt_messages(q.text, phrasing), q.answers)
            masses.append(math.fsum(math.exp(v) for v in logps))
            logs[name] += math.log10(max(masses[-1], 1e-300)) / len(chosen)
            means[name] += masses[-1] / len(chosen)
            replies.append(
                f"  [{name}] {q.text} -> {greedy_reply(model, tokenizer, prompt_messages(q.text, phrasing))!r}"
            )
        mark = " (held out)" if is_heldout(q.text) else ""
        print(f"{q.text + mark:62s} {len(q.answers):4d}  " + "  ".join(f"{m:8.2e}" for m in masses), flush=True)
    print(f"{'mean':62s} {'':4s}  " + "  ".join(f"{means[n]:8.2e}" for n in PHRASINGS))
    print(f"{'geometric mean':62s} {'':4s}  " + "  ".join(f"{10 ** logs[n]:8.2e}" for n in PHRASINGS))
    print("greedy replies:", *replies, sep="\n")
    for name, phrasing in PHRASINGS.items():
        print(f"  {name}: system={phrasing.system!r} suffix={phrasing.suffix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
