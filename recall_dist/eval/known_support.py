"""Known-support evaluation of a causal LM on one prompt: exact metrics by teacher forcing on the
support of P, and sampled estimates with Hugging Face ``generate``.

A sequence is tokenized exactly as training tokenizes it (``recall_dist.data.tokenize_example``):
``[bos] + prompt + completion + [eos]``, the completion and eos scored.  Q_T is the
per-token-tempered sequence distribution Q_T(x | prompt) = prod_t softmax(z_t / T)[x_t] over the
completion's tokens *and* the final eos, so a completion the model would continue past counts as
not generated.  The logits z_t do not depend on T: one forward per sequence serves every
temperature.  The pure maths lives in ``pr_metrics.py``; this module only turns a model into
``log Q_T`` and samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.dataset import tokenize_example
from recall_dist.eval import pr_metrics
from recall_dist.eval.tokens import pad_batch, prompt_ids, tempered_generate
from recall_dist.seeding import derive_seed


@dataclass
class EncodedPrompt:
    """A prompt and its support, tokenized.  ``completions[i]`` ends with eos; ``p[i]`` = P(x_i | prompt)."""

    prompt_ids: list[int]
    completions: list[tuple[int, ...]]
    p: np.ndarray
    texts: list[str]


def encode_prompt(tokenizer, prompt: str, target: dict[str, float]) -> EncodedPrompt:
    """Tokenize every (prompt, completion) of the support ``target`` as training does; the scored
    ids of completion i (those with a label) are ``completions[i]``, eos included."""
    texts = list(target)
    head = prompt_ids(tokenizer, prompt)
    if not head:  # a causal LM predicts nothing at position 0; training cannot teach that token either
        raise ValueError(f"prompt {prompt!r} is empty and the tokenizer has no bos: the first token has no context")
    completions = []
    for text in texts:
        example = tokenize_example(prompt, text, tokenizer)
        ids, labels = example["input_ids"], example["labels"]
        n_prompt = sum(label == IGNORE_INDEX for label in labels)
        if ids[:n_prompt] != head or labels[n_prompt:] != ids[n_prompt:]:
            raise ValueError(f"prompt {prompt!r}, completion {text!r}: training's example is not prompt + labels")
        completions.append(tuple(ids[n_prompt:]))
    return EncodedPrompt(head, completions, np.array([target[t] for t in texts], dtype=np.float64), texts)


@torch.no_grad()
def support_log_probs(
    model, encoded: EncodedPrompt, temperatures: Sequence[float], batch_size: int = 256, pad_id: int = 0
) -> np.ndarray:
    """log Q_T(x_i | prompt) for every completion of the support and every T: float64 [num_T, S].

    Teacher forcing in batches of up to ``batch_size`` completions of the same length: no padding, so a
    completion's numbers do not depend on which others share its batch (padded attention rounds
    differently, ~1e-6 relative on a 30-layer fp32 model); the log-softmax runs in fp32 on the model's
    logits divided by T, the sum over tokens in float64.

    Only the positions that predict a completion token (or its eos) get a log-softmax per T: the prompt's
    positions, most of a chat turn, would cost a ``V``-wide softmax per temperature for nothing.  The logits
    themselves come from the whole sequence, as a plain forward computes them: asking the model for the
    scored positions only (``logits_to_keep``) gives the output layer's matmul other shapes, which round
    differently (~1e-6 relative in Q_T, measured), and the numbers here equal a plain teacher-forced
    forward's to the last digit (tests/eval/test_known_support.py); the prompt's softmaxes were ~40% of the
    time on the demo-lm prompts (benchmarks/sweep_scoring_bench.py: 1.63x).
    """
    device = next(model.parameters()).device
    temps = torch.tensor(list(temperatures), dtype=torch.float32, device=device)
    out = np.empty((len(temps), len(encoded.completions)), dtype=np.float64)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(encoded.completions):
        by_length.setdefault(len(c), []).append(i)
    batches = [g[s : s + batch_size] for g in by_length.values() for s in range(0, len(g), batch_size)]
    for batch in batches:
        scored = len(encoded.completions[batch[0]])  # every row of a batch has this many scored tokens
        rows = [encoded.prompt_ids + list(encoded.completions[i]) for i in batch]
        ids, mask = pad_batch(rows, pad_id)  # same length: no padding, the mask is all ones
        ids, mask = ids.to(device), mask.to(device)
        # Position j predicts token j + 1: the scored tokens are the last ``scored``, predicted by the
        # ``scored`` positions before the last (which predicts past the eos).
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -scored - 1 : -1].float()
        targets = ids[:, -scored:]
        for k, t in enumerate(temps):
            logp = torch.log_softmax(logits / t, dim=-1).gather(-1, targets[..., None])[..., 0]
            out[k, batch] = logp.double().sum(dim=1).cpu().numpy()
    return out


@torch.no_grad()
def sample_completions(
    model,
    encoded: EncodedPrompt,
    temperature: float,
    num_samples: int,
    seed: int,
    batch_size: int,
    pad_id: int,
    eos_id: int,
) -> list[tuple[int, ...]]:
    """``num_samples`` completions of Q_T (ids up to and including the first eos; a sample that hit
    ``max_new_tokens`` without eos is returned as is, without eos, and is never valid).

    ``generate`` with KV cache, ``do_sample=True, temperature=T, top_k=0, top_p=1`` (pure tempered
    sampling).  The batch of samples [start, start + batch_size) is seeded with
    ``derive_seed(seed, start)``, so a sample depends on (seed, its index, batch_size) only — never
    on which rank runs it.
    """
    device = next(model.parameters()).device
    max_new = max(map(len, encoded.completions))  # one more token than any valid completion can use
    samples = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        ids = torch.tensor([encoded.prompt_ids] * n, dtype=torch.long, device=device)
        torch.manual_seed(derive_seed(seed, start))
        out = tempered_generate(model, ids, torch.ones_like(ids), temperature, max_new, pad_id, eos_id)
        for row in out[:, len(encoded.prompt_ids) :].tolist():
            cut = row.index(eos_id) + 1 if eos_id in row else len(row)
            samples.append(tuple(row[:cut]))
    return samples


def sampled_estimates(encoded: EncodedPrompt, samples: list[tuple[int, ...]]) -> tuple[float, float]:
    """(valid fraction, P-mass of the distinct valid samples) of one prompt's samples."""
    index = {c: i for i, c in enumerate(encoded.completions)}
    hits = [index[s] for s in samples if s in index]
    distinct = sorted(set(hits))
    return len(hits) / len(samples), float(encoded.p[distinct].sum())


def evaluate_prompt(
    model,
    encoded: EncodedPrompt,
    temperatures: Sequence[float],
    *,
    recall_at_n: int,
    num_samples: int,
    lambdas: np.ndarray,
    seeds: Sequence[int],
    score_batch_size: int,
    generate_batch_size: int,
    pad_id: int,
    eos_id: int,
) -> list[dict]:
    """All known-support numbers of one prompt at every temperature (one dict of plain floats per
    T, in ``temperatures`` order), from one teacher-forced forward per completion.

    Exact: precision, recall (@``recall_at_n``), alpha/beta over ``lambdas``.  With ``num_samples`` > 0
    also the sampled precision/recall (samples of temperature ``temperatures[k]`` seeded by
    ``seeds[k]``) and the exact variances of those estimators under Q_T (binomial for precision,
    ``recall_at_n_variance`` for recall), so the table can report standard errors.
    """
    if len(seeds) != len(temperatures):
        raise ValueError(f"{len(seeds)} seeds for {len(temperatures)} temperatures")
    log_qs = support_log_probs(model, encoded, temperatures, score_batch_size, pad_id)
    records = []
    for temperature, seed, log_q in zip(temperatures, seeds, log_qs, strict=True):
        alpha, _ = pr_metrics.pr_curve(log_q, encoded.p, lambdas)
        prec = pr_metrics.precision(log_q, encoded.p)
        recall = pr_metrics.recall_at_n(log_q, encoded.p, recall_at_n)
        record = {"precision": prec, "recall": recall, "alpha": alpha.tolist()}
        if num_samples > 0:
            samples = sample_completions(
                model, encoded, temperature, num_samples, seed, generate_batch_size, pad_id, eos_id
            )
            prec_s, rec_s = sampled_estimates(encoded, samples)
            record.update(
                precision_sampled=prec_s,
                recall_sampled=rec_s,
                precision_sampled_var=min(prec, 1.0) * max(1.0 - prec, 0.0) / num_samples,
                recall_sampled_var=pr_metrics.recall_at_n_variance(log_q, encoded.p, num_samples),
                recall_at_num_samples=pr_metrics.recall_at_n(log_q, encoded.p, num_samples),
            )
        records.append(record)
    return records
