"""demo-lm's familiar prompt group (``demo/iso_familiar.py``, ``demo/iso.unseen_prompts``): the candidates are
exactly the prompts no fine-tune trains on and no other group sweeps; the base model's Precision that ranks
them equals the sweep's exact teacher-forced computation; the choice is the top ``n`` with ties by hash; the
group's support file joins the sweep's file and never holds a trained or swept prompt."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from recall_dist.demo.iso import unseen_prompts, write_demo_data
from recall_dist.demo.iso_familiar import (
    base_precisions,
    choose_familiar,
    familiar_prompts,
    read_scores,
    shared_prompt_log_probs,
    write_scores,
)
from recall_dist.demo.iso_prompts import CURRENCY_PROMPT, Prompt, split_prompts, support_rows
from recall_dist.demo.pipeline import DemoError
from tests.demo.test_iso import PROMPTS, _questions, _rows, tiny_chat_model


def _asked(path: Path) -> set[str]:
    return {q.removesuffix(" Answer with the name only.") for q in _questions(_rows(path))}


def test_candidates_are_the_prompts_never_trained_on_nor_swept(tmp_path):
    data = write_demo_data(tmp_path / "d", PROMPTS, num_examples=300, train_prompts=5, heldout_prompts=2)
    heldout = split_prompts(PROMPTS)[1]
    swept = _asked(data["support_train"]) | _asked(data["support_heldout"])
    candidates = {p.text for p in unseen_prompts(PROMPTS, 5, 2)}
    assert candidates == {p.text for p in PROMPTS} - swept
    assert not candidates & _asked(data["train"])
    assert len(candidates) == len(PROMPTS) - 5 - 2
    # training on every training prompt leaves only the unswept held-out ones
    assert {p.text for p in unseen_prompts(PROMPTS, 5, 2, train_on="all")} == {p.text for p in heldout} - swept
    with pytest.raises(DemoError, match="train_on"):
        unseen_prompts(PROMPTS, 5, 2, train_on="some")


def test_choose_familiar_takes_the_highest_precision_ties_by_hash():
    prompts = PROMPTS[:6]
    precisions = [0.1, 0.5, 0.3, 0.5, 0.0, 0.2]
    tied = sorted([prompts[1], prompts[3]], key=lambda p: hashlib.sha256(p.text.encode()).hexdigest())
    assert choose_familiar(prompts, precisions, 3) == [*tied, prompts[2]]
    assert choose_familiar(prompts, precisions, 10)[-1] == prompts[4]  # all of them, lowest last
    with pytest.raises(ValueError, match="precisions"):
        choose_familiar(prompts, precisions[:5], 2)
    with pytest.raises(ValueError, match="finite"):
        choose_familiar(prompts, [*precisions[:5], float("nan")], 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_chat_model(tmp_path_factory.mktemp("familiar") / "tiny")


def test_base_precision_equals_the_sweeps_exact_computation(model_dir, tmp_path):
    """The ranking's Precision equals the sweep's own: ``support_log_probs`` (no padding, exact) on the
    support file the sweep reads, Q_1 summed over the answers."""
    import torch
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.eval.known_support import support_log_probs
    from recall_dist.eval.support_file import SupportFile, write_support_file

    prompts = [
        Prompt(CURRENCY_PROMPT.format(word="krone"), ("Danish Krone", "Norwegian Krone", "Swedish Krona", "Øre"), "x"),
        Prompt(CURRENCY_PROMPT.format(word="peso"), tuple(f"Peso {k}" for k in range(1, 12)), "x"),
    ]
    got = base_precisions(model_dir, prompts)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(model_dir))
    sweep_file = SupportFile(write_support_file(support_rows(prompts), tmp_path / "support.jsonl"))
    for prompt, value in zip(prompts, got, strict=True):
        (key,) = [k for k in sweep_file.prompts() if prompt.text in k]
        encoded = sweep_file.encode(tokenizer, key)
        exact = support_log_probs(model, encoded, [1.0], pad_id=tokenizer.pad_token_id)[0]
        np.testing.assert_allclose(shared_prompt_log_probs(model, encoded, tokenizer.pad_token_id), exact, rtol=1e-5)
        assert value == pytest.approx(float(np.exp(exact).sum()), rel=1e-5)
        assert 0 < value < 1


def test_the_familiar_group_joins_the_sweeps_file(tmp_path):
    familiar = unseen_prompts(PROMPTS, 5, 2)[:3]
    data = write_demo_data(
        tmp_path / "d", PROMPTS, num_examples=100, train_prompts=5, heldout_prompts=2, familiar=familiar
    )
    names = ("support_train", "support_reworded", "support_familiar", "support_heldout")
    rows = {name: _rows(data[name]) for name in names}
    assert _asked(data["support_familiar"]) == {p.text for p in familiar}
    assert _rows(data["support"]) == [row for group in rows.values() for row in group]
    assert not _asked(data["support_familiar"]) & _asked(data["train"])
    # a trained or swept prompt cannot be familiar
    swept = [p for p in PROMPTS if p.text in _asked(data["support_train"])][:1]
    with pytest.raises(DemoError, match="familiar prompts must be unseen"):
        write_demo_data(tmp_path / "e", PROMPTS, num_examples=10, train_prompts=5, heldout_prompts=2, familiar=swept)
    # a later call without the group leaves no stale file for the report to pick up
    write_demo_data(tmp_path / "d", PROMPTS, num_examples=100, train_prompts=5, heldout_prompts=2)
    assert not (tmp_path / "d" / "support_familiar.jsonl").exists()
    assert json.loads((tmp_path / "d" / "support.jsonl").read_text().splitlines()[-1])["completion"]


def test_scores_file_lists_every_candidate_and_is_reused_only_for_the_same_prompts_and_model(tmp_path):
    prompts, precisions = PROMPTS[:4], [0.2, 0.7, 0.1, 1e-7]
    chosen = choose_familiar(prompts, precisions, 2)
    path = write_scores(tmp_path / "s.csv", prompts, precisions, chosen, "/models/a")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["base_precision_t1"]) for r in rows] == [0.7, 0.2, 0.1, 1e-7]
    assert [r["familiar"] for r in rows] == ["1", "1", "0", "0"]
    assert rows[0]["prompt"] == prompts[1].text
    assert read_scores(path, prompts, "/models/a") == precisions  # exact, in the order asked
    assert read_scores(path, list(reversed(prompts)), "/models/a") == list(reversed(precisions))
    assert read_scores(path, prompts, "/models/b") is None
    assert read_scores(path, PROMPTS[:3], "/models/a") is None
    assert read_scores(tmp_path / "missing.csv", prompts, "/models/a") is None
    # --resume takes them without loading any model (there is none at this path)
    assert familiar_prompts("/models/a", prompts, 2, path, reuse=True) == chosen
