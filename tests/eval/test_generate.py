"""Batched KV-cache sampling (``eval/generate.py``) against a naive reference: one row at a time, the
whole sequence re-run through the model at every step (no cache, no padding), the same uniforms; and
its draws against the closed-form tempered distribution of a bigram model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recall_dist.eval.generate import SampleRow, inverse_cdf_sample, row_uniforms, sample_rows, stop_token_ids
from tests.eval.models import bigram_llama, random_llama

EOS = 2


def _naive(model, row: SampleRow, max_new: int, stops: set[int]) -> list[int]:
    ids, u, out = list(row.prompt), row_uniforms(row.seed, max_new), []
    for t in range(max_new):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        cdf = np.cumsum(torch.softmax(logits / row.temperature, -1).numpy())
        token = min(int(np.searchsorted(cdf, u[t].item() * cdf[-1], side="right")), len(cdf) - 1)
        out.append(token)
        ids.append(token)
        if token in stops:
            break
    return out


def _rows():
    prompts = [(1, 5, 6), (1,), (1, 7, 8, 9, 3), (1, 5, 6)]
    return [SampleRow(prompts[i % 4], t, 100 + i) for i, t in enumerate([0.7, 1.5, 2.0, 1.0, 0.5, 3.0] * 2)]


@pytest.mark.parametrize("batch_rows", [1, 5, 12])
def test_rows_equal_the_naive_sampler(batch_rows):
    model = random_llama(12, seed=0)
    rows = _rows()
    got = sample_rows(model, rows, 20, {EOS}, pad_id=0, batch_rows=batch_rows)
    assert got == [_naive(model, r, 20, {EOS}) for r in rows]
    lengths = {len(g) for g in got}
    assert len(lengths) > 1 and max(lengths) == 20  # some rows stop early, some run to the limit
    assert all(g[-1] == EOS for g in got if len(g) < 20)


def test_inverse_cdf_sample_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 30, generator=g) * 3
    temps = torch.rand(50, generator=g) * 2 + 0.2
    u = torch.rand(50, generator=g, dtype=torch.float64)
    got = inverse_cdf_sample(logits, temps, u).tolist()
    for b in range(50):
        p = np.exp((logits[b] / temps[b]).double().numpy() - (logits[b] / temps[b]).double().numpy().max())
        cdf = np.cumsum(p / p.sum())
        assert got[b] == min(int(np.searchsorted(cdf, u[b].item(), side="right")), 29), b


def test_first_tokens_follow_the_tempered_distribution():
    """A bigram model's first token after bos is distributed as softmax(B[bos] / T): chi-square test."""
    rng = np.random.default_rng(0)
    bigram = rng.normal(size=(8, 8)) * 1.5
    model = bigram_llama(bigram)
    n = 3000
    for t in (0.5, 1.7):
        rows = [SampleRow((1,), t, seed) for seed in range(n)]
        first = np.array([ids[0] for ids in sample_rows(model, rows, 1, {EOS}, pad_id=0, batch_rows=n)])
        p = np.exp(bigram[1] / t - (bigram[1] / t).max())
        p /= p.sum()
        observed = np.bincount(first, minlength=8)
        keep = p * n >= 5
        chi2 = (((observed - n * p) ** 2) / (n * p))[keep].sum()
        assert chi2 < 30, (t, observed, (n * p).round())  # 7 degrees of freedom: p-value ~ 1e-4


def test_errors_and_stop_ids():
    model = random_llama(12, seed=0)
    with pytest.raises(ValueError, match="at least one token"):
        sample_rows(model, [SampleRow((), 1.0, 0)], 4, {EOS}, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_rows(model, [SampleRow((1,), 0.0, 0)], 4, {EOS}, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_rows(model, [SampleRow((1,), 1.0, 0)], 0, {EOS}, 0)

    class Tok:
        eos_token_id = 2

    model.generation_config.eos_token_id = [2, 7]
    assert stop_token_ids(model, Tok()) == {2, 7}
