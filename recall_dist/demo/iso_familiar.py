"""demo-lm's "familiar" prompt group: prompts no fine-tune trains on whose answers the *base* model already
knows, chosen by scoring the base model before any fine-tune.

Why: the hash-held-out prompts (``iso_prompts.split_prompts``) are answered by neither SmolLM2-135M nor
Gemma 3 270M (Precision <= 0.011 at every temperature, docs/demo-lm/summary.md), so they cannot tell
whether a recall loss changes how a model's *other* knowledge responds to temperature.  This group can:
of the candidate prompts (every prompt no fine-tune sees and no other group sweeps: ``iso.unseen_prompts``)
it keeps the ``n`` on which the base model puts the most probability on the valid answers at T = 1, i.e.
its exact Precision Q_1(answers) through the chat template: the sweep's teacher forcing
(``eval/known_support.support_log_probs``) with the prompt's forward shared by its answers, equal to it within
1e-5 (tests/demo/test_iso_familiar.py).  The choice uses only the base model, so it favours no loss.
Ties (equal Precision) are broken by the SHA-256 of the prompt's text.
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from pathlib import Path

import numpy as np

from recall_dist.demo import iso_prompts


def shared_prompt_log_probs(model, encoded, pad_id: int = 0) -> np.ndarray:
    """log Q_1(x_i | prompt) of every completion of ``encoded`` (``eval/known_support.EncodedPrompt``): the
    prompt's forward once, its key/value cache repeated over the completions, and the completions in one
    right-padded batch on top; float64 [S].  The sweep's ``support_log_probs`` runs prompt + completion
    for each completion, exact to the last digit; this rounds differently (~1e-6 relative), which a
    ranking does not notice, and costs the prompt once instead of once per answer (the prompt is most of
    the tokens: a chat template and a question against a name of a few tokens)."""
    import torch
    from transformers import DynamicCache

    from recall_dist.eval.generate import cache_keyword
    from recall_dist.eval.tokens import pad_batch

    n = len(encoded.completions)
    ids, mask = pad_batch([list(c) for c in encoded.completions], pad_id)
    cache, kw = DynamicCache(), cache_keyword(model)
    with torch.no_grad():
        head = model(input_ids=torch.tensor([encoded.prompt_ids]), use_cache=True, **{kw: cache})
        first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)  # predicts every completion's token 0
        cache.batch_repeat_interleave(n)
        full_mask = torch.cat([torch.ones(n, len(encoded.prompt_ids), dtype=mask.dtype), mask], dim=1)
        logits = model(input_ids=ids, attention_mask=full_mask, use_cache=True, **{kw: cache}).logits[:, :-1].float()
    rest = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
    return (first[ids[:, 0]].double() + rest.double().sum(dim=1)).numpy()


def base_precisions(model_path: str | Path, prompts: list[iso_prompts.Prompt]) -> list[float]:
    """The exact Precision Q_1(answers | prompt) of the model at ``model_path`` for each prompt, in order:
    float32 on this process's CPU, every answer teacher-forced as training tokenizes it (chat template)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.eval.support_file import encode_support, supports_from_rows
    from recall_dist.eval.tokens import pad_token_id

    tokenizer = load_tokenizer(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    pad_id = pad_token_id(tokenizer)
    out = []
    for prompt in tqdm(prompts, desc="familiar candidates", unit="prompt", mininterval=10):
        rows = enumerate(iso_prompts.support_rows([prompt]), start=1)
        (support,) = supports_from_rows(rows, f"candidate {prompt.text!r}").values()
        logq = shared_prompt_log_probs(model, encode_support(tokenizer, support, "familiar candidates"), pad_id)
        out.append(float(np.exp(np.logaddexp.reduce(logq))))
    return out


def choose_familiar(prompts: list[iso_prompts.Prompt], precisions: list[float], n: int) -> list[iso_prompts.Prompt]:
    """The ``n`` prompts of highest Precision (ties: by SHA-256 of the text), in that order."""
    if len(precisions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(precisions)} precisions")
    if any(not math.isfinite(p) or p < 0 for p in precisions):
        raise ValueError(f"precisions must be finite and >= 0, got {precisions}")
    order = sorted(
        range(len(prompts)),
        key=lambda i: (-precisions[i], hashlib.sha256(prompts[i].text.encode()).hexdigest()),
    )
    return [prompts[i] for i in order[:n]]


def write_scores(path: Path, prompts: list[iso_prompts.Prompt], precisions: list[float], chosen, model: str) -> Path:
    """``familiar_scores.csv``: every candidate's base Precision at T = 1, highest first, whether chosen, and
    the model that scored it."""
    picked = {p.text for p in chosen}
    rows = sorted(zip(prompts, precisions, strict=True), key=lambda r: -r[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "source", "answers", "base_precision_t1", "familiar", "model"])
        for prompt, precision in rows:
            w.writerow(
                [prompt.text, prompt.source, len(prompt.answers), repr(precision), int(prompt.text in picked), model]
            )
    return path


def read_scores(path: Path, prompts: list[iso_prompts.Prompt], model: str) -> list[float] | None:
    """The precisions ``write_scores`` wrote for exactly these prompts and this model, in the order of
    ``prompts``; None when the file is missing or was written for other prompts or another model."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    scores = {r["prompt"]: float(r["base_precision_t1"]) for r in rows if r.get("model") == model}
    if len(rows) != len(prompts) or set(scores) != {p.text for p in prompts}:
        return None
    return [scores[p.text] for p in prompts]


def familiar_prompts(
    model_path: str | Path,
    candidates: list[iso_prompts.Prompt],
    n: int,
    scores_csv: Path,
    label: str = "",
    reuse: bool = False,
) -> list[iso_prompts.Prompt]:
    """Score ``candidates`` on the base model, write ``scores_csv``, return the ``n`` familiar prompts.
    ``reuse`` (``--resume``): take the scores ``scores_csv`` holds for the same candidates and model."""
    if n <= 0 or not candidates:
        return []
    start = time.monotonic()
    model = str(model_path)
    precisions = read_scores(scores_csv, candidates, model) if reuse else None
    if precisions is None:
        print(
            f"{label} familiar prompts: scoring {len(candidates)} never-trained prompts on the base model", flush=True
        )
        precisions = base_precisions(model_path, candidates)
    chosen = choose_familiar(candidates, precisions, n)
    write_scores(scores_csv, candidates, precisions, chosen, model)
    kept = sorted(precisions, reverse=True)[: len(chosen)]
    print(
        f"{label} familiar prompts: kept {len(chosen)} of {len(candidates)} (base Precision at T = 1 "
        f"{kept[-1]:.2g}-{kept[0]:.2g}) in {time.monotonic() - start:.0f} s -> {scores_csv}",
        flush=True,
    )
    return chosen
