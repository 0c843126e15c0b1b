"""``recall-dist demo-lm`` (``demo/iso.py``): the data files and the overrides the recipe passes (held-out
and reworded prompts never reach the training file; the sweep scores the union of the groups' support
files), the
shipped configs load, and a ``--quick`` run end to end on a tiny random Llama with a ChatML template
(real torchrun x 2 fine-tunes on FSDP2 and the real sweep)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recall_dist.demo.iso import CONFIG_DIR, IsoRecipe, sweep_subset, write_demo_data
from recall_dist.demo.iso_prompts import CURRENCY_PROMPT, Prompt, is_heldout, reworded, split_prompts
from recall_dist.demo.pipeline import LOSSES, DemoError, Run, Setting, references

# 30 prompts: the hash split holds some of them out (checked below, so the test fails loudly if not)
PROMPTS = [
    Prompt(CURRENCY_PROMPT.format(word=f"unit{k}"), tuple(f"Thing {k}-{a}" for a in range(3 + k % 4)), "x")
    for k in range(30)
]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _questions(rows: list[dict]) -> set[str]:
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return write_demo_data(tmp_path_factory.mktemp("iso") / "data", PROMPTS, num_examples=200, train_prompts=5)


def test_heldout_prompts_never_reach_the_training_file(data):
    training, heldout = split_prompts(PROMPTS)
    assert len(heldout) >= 2 and len(training) >= 10
    train_rows = _rows(data["train"])
    assert len(train_rows) == 200
    asked = {q.removesuffix(" Answer with the name only.") for q in _questions(train_rows)}
    assert asked <= {p.text for p in training}
    assert not asked & {p.text for p in heldout}
    assert not any(is_heldout(q) for q in asked)
    assert not asked & {reworded(p).text for p in PROMPTS}


def test_the_sweep_scores_a_fixed_training_subset_and_every_heldout_prompt(data):
    training, heldout = split_prompts(PROMPTS)
    by_hash = sorted(training, key=lambda p: hashlib.sha256(p.text.encode()).hexdigest())[:5]
    train_support, heldout_support = _rows(data["support_train"]), _rows(data["support_heldout"])
    assert [
        q.removesuffix(" Answer with the name only.")
        for q in dict.fromkeys(r["messages"][-1]["content"] for r in train_support)
    ] == [p.text for p in by_hash]
    assert {r["completion"] for r in heldout_support} == {a for p in heldout for a in p.answers}
    # the reworded group: the same supports (answers and p, row for row) under the reworded questions
    reworded_support = _rows(data["support_reworded"])
    assert [(r["completion"], r["p"]) for r in reworded_support] == [(r["completion"], r["p"]) for r in train_support]
    assert [r["messages"][-1]["content"] for r in reworded_support] == [
        "Tell me one currency known as the " + r["messages"][-1]["content"].removeprefix("Name a currency called the ")
        for r in train_support
    ]
    assert _rows(data["support"]) == train_support + reworded_support + heldout_support  # the sweep's file
    assert sweep_subset(list(reversed(training)), 5) == by_hash  # independent of the order given


def test_recipe_overrides(data, tmp_path):
    recipe = IsoRecipe.full()
    recipe.out = tmp_path
    prepared = recipe.prepared("/models/lm", data)
    run = Run("cdiv-1.4", Setting("cdiv-1.4", "cdiv", {"alpha": 1.4}), 0, False)
    overrides = recipe.finetune_overrides(prepared, run, tmp_path / "runs" / run.name)
    assert f"data.source={data['train']}" in overrides
    assert "model.name_or_path=/models/lm" in overrides
    assert f"data.num_samples={recipe.finetune_steps * recipe.global_batch}" in overrides
    assert not any(str(data["support_heldout"]) in o or "eval_source" in o for o in overrides)
    sweep = recipe.sweep_overrides(prepared, recipe.runs())
    assert f"support={data['support']}" in sweep
    assert sweep[0].startswith("models=[{name: nll, path: ")
    assert [r.name for r in recipe.runs()] == [s.name for s in LOSSES] + ["nll-112steps", "cdiv-1.1-112steps"]
    # the grid's finalist trains twice the steps, against NLL trained as long; the data holds enough for both
    long = recipe.runs()[-1]
    overrides = recipe.finetune_overrides(prepared, long, tmp_path / "runs" / long.name)
    assert "train.max_steps=112" in overrides and f"data.num_samples={112 * recipe.global_batch}" in overrides
    assert recipe.max_steps() == 112 == 2 * recipe.finetune_steps
    assert references(recipe.losses)["cdiv-1.1-112steps"] == "nll-112steps"


def test_shipped_configs_and_sizes(tmp_path):
    from recall_dist.configtree import load_config
    from recall_dist.eval.config import SweepConfig
    from recall_dist.train.config import load_train_config

    recipe = IsoRecipe.full()
    temps = recipe.temperatures
    assert len(temps) >= 12 and min(temps) == 0.3 and max(temps) == 2.5 and temps == sorted(temps)
    assert sum(t <= 1.0 for t in temps) > sum(t > 1.0 for t in temps)  # dense where Precision is high
    sizes = (recipe.finetune_steps, recipe.global_batch, recipe.train_prompts, recipe.heldout_prompts)
    assert sizes == (56, 16, 16, 16)
    cfg = load_train_config(CONFIG_DIR / "finetune.yaml", ["model.name_or_path=/models/lm", "data.source=x.jsonl"])
    assert cfg.backend.name == "fsdp2"
    support = Path(__file__).resolve().parents[2] / "configs" / "support_example.jsonl"
    sweep = load_config(
        SweepConfig, CONFIG_DIR / "sweep.yaml", [f"support={support}", f"models=[{{name: nll, path: {tmp_path}}}]"]
    )
    assert sweep.metric == "known_support" and sweep.num_samples == 0 and sweep.recall_at_n == 100


def tiny_chat_model(directory: Path) -> Path:
    """A tiny random Llama saved with the offline ChatML tokenizer (byte-level BPE, eos <|im_end|>)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.data.chat_tokenizer import chatml_tokenizer

    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/iso-codes/json/iso_3166-2.json").is_file(), reason="needs iso-codes")
def test_quick_run_end_to_end(tmp_path):
    model, out = tiny_chat_model(tmp_path / "tiny"), tmp_path / "out"
    cmd = [sys.executable, "-m", "recall_dist", "demo-lm", "--quick", "--model", str(model), "--out", str(out)]
    done = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("sweep.csv", "sweep_prompts.csv", "summary.md", "samples.md", "pr_curve.png"):
        assert (out / name).is_file(), name
    for group in ("training", "reworded", "familiar", "heldout"):
        assert (out / f"pr_curve_{group}.png").is_file(), group
    with open(out / "sweep_prompts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    quick = IsoRecipe.quick()
    groups = 2 * quick.train_prompts + quick.familiar_prompts + quick.heldout_prompts
    assert len(rows) == 2 * len(quick.temperatures) * groups
    with open(out / "data" / "familiar_scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    assert len(scores) == quick.familiar_candidates and sum(r["familiar"] == "1" for r in scores) == 2
    text = (out / "summary.md").read_text()
    for group in ("training", "reworded", "familiar", "held-out"):
        assert f"## Recall over NLL at the same Precision: {group} prompts (2)" in text
    assert "| cdiv-1.4 |" in text and "## nll" in (out / "samples.md").read_text()


def test_training_examples_come_from_the_swept_prompts_by_default(data, tmp_path):
    """train_on="swept" (the default) trains on exactly the swept training prompts, "all" on every training
    prompt; the held-out ones never."""
    swept = {
        r["messages"][-1]["content"].removesuffix(" Answer with the name only.") for r in _rows(data["support_train"])
    }
    asked = {q.removesuffix(" Answer with the name only.") for q in _questions(_rows(data["train"]))}
    assert asked == swept and len(swept) == 5
    every = write_demo_data(tmp_path / "all", PROMPTS, num_examples=2000, train_prompts=5, train_on="all")
    asked_all = {q.removesuffix(" Answer with the name only.") for q in _questions(_rows(every["train"]))}
    assert asked_all == {p.text for p in split_prompts(PROMPTS)[0]}
    with pytest.raises(DemoError, match="train_on"):
        write_demo_data(tmp_path / "bad", PROMPTS, num_examples=10, train_prompts=5, train_on="some")
