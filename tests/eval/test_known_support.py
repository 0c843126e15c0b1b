"""Teacher-forced log Q_T and sampled estimates on a hand-built bigram Llama, whose tempered
sequence distribution is written down here from its logit matrix alone (numpy, no model)."""

import itertools

import numpy as np
import pytest

from recall_dist.data import CharTokenizer, build_task
from recall_dist.eval import known_support, pr_metrics
from tests.eval.models import bigram_llama

TASK = build_task("product", max_factor=4)  # support {1, 2, 3, 4, 6, 8, 9, 12, 16}
TOKENIZER = CharTokenizer(TASK.alphabet)


def _bigram_matrix(seed=0):
    rng = np.random.default_rng(seed)
    b = 1.5 * rng.standard_normal((TOKENIZER.vocab_size, TOKENIZER.vocab_size))
    b[:, TOKENIZER.eos_token_id] += 2.5  # stop after one or two digits often: precision ~ 0.2-0.3
    b[:, :2] -= 6.0  # pad and bos are rarely generated
    b[1, 3] -= 3.0  # a leading '0' is rare
    b[1, 2] -= 6.0  # so is an empty completion
    return b


def _reference_log_q(b, texts, temperature):
    """log prod_t softmax(B[prev_t] / T)[x_t] over the completion's characters and eos."""
    out = []
    for text in texts:
        ids = TOKENIZER.encode(text, add_bos=True, add_eos=True)
        total = 0.0
        for prev, nxt in itertools.pairwise(ids):
            z = b[prev] / temperature
            total += z[nxt] - np.log(np.exp(z - z.max()).sum()) - z.max()
        out.append(total)
    return np.array(out)


@pytest.fixture(scope="module")
def setup():
    b = _bigram_matrix()
    encoded = known_support.encode_prompt(TOKENIZER, "", TASK.target_distribution(""))
    return b, bigram_llama(b), encoded


def test_teacher_forcing_matches_the_written_down_distribution(setup):
    b, model, encoded = setup
    temps = [0.5, 1.0, 1.7]
    got = known_support.support_log_probs(model, encoded, temps, batch_size=4)  # several ragged batches
    for k, t in enumerate(temps):
        ref = _reference_log_q(b, encoded.texts, t)
        np.testing.assert_allclose(got[k], ref, rtol=0, atol=2e-5)
        assert pr_metrics.precision(got[k], encoded.p) == pytest.approx(np.exp(ref).sum(), abs=1e-5)
    # The hand-built model is a real bigram: a different context must not change the numbers.
    shifted = known_support.EncodedPrompt([1, 3, 3], encoded.completions, encoded.p, encoded.texts)
    assert not np.allclose(known_support.support_log_probs(model, shifted, [1.0])[0], got[1])


@pytest.mark.parametrize("temperature", [0.7, 1.4])
def test_sampled_estimates_agree_with_exact_within_3_se(setup, temperature):
    """Each replicate (N = 40 samples) within 3 SE is too weak a check alone; the mean of 20
    independent replicates must also sit within 3 SE of the mean (SE / sqrt(20))."""
    _, model, encoded = setup
    n, reps = 40, 20
    records = [
        known_support.evaluate_prompt(
            model,
            encoded,
            [temperature],
            recall_at_n=n,
            num_samples=n,
            lambdas=pr_metrics.default_lambdas(),
            seeds=[1000 + r],
            score_batch_size=64,
            generate_batch_size=16,
            pad_id=0,
            eos_id=TOKENIZER.eos_token_id,
        )[0]
        for r in range(reps)
    ]
    exact = records[0]
    assert 0.1 < exact["precision"] < 0.9 and 0.1 < exact["recall"] < 0.9  # both estimates informative
    for key in ("precision", "recall"):
        se = np.sqrt(exact[f"{key}_sampled_var"])
        estimates = np.array([r[f"{key}_sampled"] for r in records])
        assert abs(estimates[0] - exact[key]) < 3 * se, (key, estimates[0], exact[key], se)
        assert abs(estimates.mean() - exact[key]) < 3 * se / np.sqrt(reps), (key, estimates.mean(), exact[key])


def test_samples_depend_on_seed_only(setup):
    _, model, encoded = setup
    kw = {"temperature": 1.0, "num_samples": 50, "batch_size": 16, "pad_id": 0, "eos_id": 2}
    a = known_support.sample_completions(model, encoded, seed=7, **kw)
    assert a == known_support.sample_completions(model, encoded, seed=7, **kw)
    assert a != known_support.sample_completions(model, encoded, seed=8, **kw)
    assert len(a) == 50 and all(len(s) <= 3 for s in a)  # at most 2 digits + eos, or truncated


def test_sampled_estimates_counting():
    encoded = known_support.EncodedPrompt([1], [(3, 2), (4, 2)], np.array([0.25, 0.75]), ["a", "b"])
    samples = [(3, 2), (3, 2), (5, 2), (3,), (3, 3, 3)]
    assert known_support.sampled_estimates(encoded, samples) == (0.4, 0.25)


def test_one_forward_serves_every_temperature(setup, monkeypatch):
    """All temperatures come from one teacher-forced pass (ceil(S / batch) forwards, not that many
    per T), and each equals the single-temperature evaluation."""
    _, model, encoded = setup
    calls, forward = [], type(model).forward

    def counting_forward(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    temps, batch = [0.5, 1.0, 1.7], 4
    kw = {
        "recall_at_n": 30,
        "num_samples": 0,
        "lambdas": pr_metrics.default_lambdas(),
        "score_batch_size": batch,
        "generate_batch_size": 8,
        "pad_id": 0,
        "eos_id": TOKENIZER.eos_token_id,
    }
    together = known_support.evaluate_prompt(model, encoded, temps, seeds=[0, 0, 0], **kw)
    assert len(calls) == -(-len(encoded.completions) // batch) and sum(calls) == len(encoded.completions)
    for t, record in zip(temps, together, strict=True):
        assert record == known_support.evaluate_prompt(model, encoded, [t], seeds=[0], **kw)[0]
    assert len(calls) == 4 * -(-len(encoded.completions) // batch)


def test_scored_positions_only_equal_the_whole_sequence_softmax():
    """The log-softmax at the scored positions only gives the numbers of the whole sequence's log-softmax
    to the last digit: a random 2-layer Llama (context matters, unlike the bigram), a prompt of several
    tokens, completions of two lengths, against a plain loop over full-sequence forwards."""
    import torch

    from tests.eval.models import random_llama

    model = random_llama(TOKENIZER.vocab_size, seed=3).eval()
    encoded = known_support.encode_prompt(TOKENIZER, "3412", TASK.target_distribution(""))
    assert {len(c) for c in encoded.completions} == {2, 3}  # one or two digits, then eos
    temps = [0.4, 1.0, 2.5]
    # One completion per forward on both sides: batching rounds the body's matmuls differently (~1e-8).
    got = known_support.support_log_probs(model, encoded, temps, batch_size=1)
    prompt = encoded.prompt_ids
    for i, completion in enumerate(encoded.completions):
        ids = torch.tensor([prompt + list(completion)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()  # every position, prompt included
        for k, t in enumerate(temps):
            logp = torch.log_softmax(logits / t, dim=-1)[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])
            assert got[k, i] == logp[:, 0].double().sum().item()
