"""demo-text's own parts (recall_dist/demo/fortunes.py, fortunes_report.py): the fortunes corpus
(parsing, filters, the hash split), the report's numbers and verdicts from a sweep.csv, each against
values worked out independently here, and which fine-tunes ``--resume`` reuses."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os

import pytest

from recall_dist.demo.fortunes import PROMPT, SYSTEM, FortunesRecipe, is_heldout, read_fortunes, write_corpus
from recall_dist.demo.fortunes_report import precision_levels, summary_markdown, tie_tolerance


def _fortunes_dir(tmp_path):
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "wisdom").write_text(
        "A bird in the hand is worth two in the bush.\n%\n"
        "Too short.\n%\n"
        "He who laughs last\n    laughs best, or so they tell me.\n\t-- Anonymous\n%\n"
        "A bird in the hand is worth two in the bush.\n%\n"  # a duplicate
        "Caf\u00e9 society is not what it used to be, says the waiter.\n%\n" + "x" * 151 + "\n%\n"  # not ASCII
    )
    (d / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    os.symlink(d / "wisdom", d / "wisdom.u8")
    (d / "art").write_text("|  ___  |  a picture drawn in characters here  |\n%\n")
    (d / "people").write_text("The best way to predict the future is to invent it. -- Alan Kay\n%\n")
    return d


def test_read_fortunes_folds_filters_and_dedupes(tmp_path):
    texts = read_fortunes(_fortunes_dir(tmp_path))
    assert texts == sorted(
        [
            "A bird in the hand is worth two in the bush.",
            "He who laughs last laughs best, or so they tell me. -- Anonymous",
            "The best way to predict the future is to invent it. -- Alan Kay",
        ]
    )


def test_read_fortunes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        read_fortunes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "short").write_text("tiny\n%\n")
    with pytest.raises(ValueError, match="no fortune of 30-150 characters"):
        read_fortunes(tmp_path / "empty")


def test_corpus_split_is_by_hash_and_rows_are_chat_turns(tmp_path):
    texts = [f"Fortune number {i} says that good things come to those who wait." for i in range(200)]
    train, heldout, n_train, n_heldout = write_corpus(tmp_path, texts, seed=3)
    rows = {
        name: [json.loads(line) for line in path.read_text().splitlines()]
        for name, path in (("train", train), ("heldout", heldout))
    }
    replies = {name: [r["messages"][-1]["content"] for r in rs] for name, rs in rows.items()}
    assert sorted(replies["heldout"]) == sorted(t for t in texts if is_heldout(t))
    assert sorted(replies["train"] + replies["heldout"]) == sorted(texts)
    assert (n_train, n_heldout) == (len(replies["train"]), len(replies["heldout"])) and 5 < n_heldout < 40
    assert all(
        [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        and r["messages"][0]["content"] == SYSTEM
        and r["messages"][1]["content"] == PROMPT
        for rs in rows.values()
        for r in rs
    )
    # Another training seed shuffles the training rows only; the held-out order is fixed.
    _, heldout2, *_ = write_corpus(tmp_path / "again", list(reversed(texts)), seed=4)
    assert heldout2.read_text() == heldout.read_text()


def _write_csv(path, curves, num_texts=400):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "temperature", "precision", "recall", "num_texts"])
        w.writeheader()
        for model, points in curves.items():
            for t, p, r in points:
                w.writerow({"model": model, "temperature": t, "precision": p, "recall": r, "num_texts": num_texts})
    return path


def _interp_recall(points, level):
    """Best Recall at Precision >= level along the T-ordered polyline (independent re-derivation)."""
    best = max((r for _, p, r in points if p >= level), default=math.nan)
    for (_, p0, r0), (_, p1, r1) in itertools.pairwise(points):
        if (p0 - level) * (p1 - level) < 0:
            best = max(best, r0 + (level - p0) / (p1 - p0) * (r1 - r0))
    return best


def test_summary_numbers_and_verdicts(tmp_path):
    nll = [(0.6, 0.905, 0.20), (1.0, 0.801, 0.40), (1.4, 0.50, 0.45)]
    better = [(0.6, 0.92, 0.30), (1.0, 0.85, 0.50), (1.4, 0.60, 0.60)]
    worse = [(0.6, 0.70, 0.10), (1.0, 0.60, 0.20), (1.4, 0.40, 0.30)]
    path = _write_csv(tmp_path / "sweep.csv", {"nll": nll, "cdiv-1.4": better, "truncr": worse})
    assert precision_levels({"nll": {0: nll}}) == (0.9, 0.8)  # NLL's Precision at T <= 1, rounded down
    assert tie_tolerance(400) == 0.025
    text = summary_markdown(path)
    row = next(line for line in text.splitlines() if line.startswith("| cdiv-1.4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected = [_interp_recall(better, 0.9), _interp_recall(better, 0.8), 0.6]
    assert [float(c.split()[0]) for c in cells[1:4]] == pytest.approx(expected, abs=5e-4)
    margin = expected[0] - _interp_recall(nll, 0.9)
    assert float(cells[4].split()[0]) == pytest.approx(margin, abs=5e-4)
    assert cells[5].startswith("1 of 1")
    assert "- cdiv-1.4: dominates NLL + temperature" in text
    assert "- truncr: does not dominate NLL + temperature" in text
    # truncr's Precision never reaches NLL's 0.801 at T = 1 (its best is 0.70): no Recall to report there
    assert "best Recall at NLL's T = 1 Precision: none (no temperature reaches that Precision) vs 0.400" in text
    assert "nan" not in text
    # NLL gains 0.05 of Recall above T = 1, more than the tolerance 0.025.
    assert "Best Recall at a T above 1 minus Recall at T = 1: +0.050" in text
    # a --resume call: the reused fine-tunes are named as such, not given this call's time
    times = {"fine-tune nll-s0": None, "fine-tune cdiv-1.4-s0": 75.0, "sweep": 125.0}
    text = summary_markdown(path, recipe=FortunesRecipe.full(), wall_seconds=200.0, stage_seconds=times)
    assert "1 of the fine-tunes were finished by an earlier, interrupted call and reused" in text
    assert "| fine-tune nll-s0 | reused: finished by an earlier call (--resume) |" in text
    assert "| fine-tune cdiv-1.4-s0 | 1:15 |" in text


def _overrides(root, loss="nll", seed=0, model="/models/lm", steps=None):
    """The fine-tune overrides demo-text passes for one run under ``root`` (quick recipe)."""
    from recall_dist.demo.pipeline import Run, Setting

    recipe = FortunesRecipe.quick()
    recipe.finetune_steps = steps or recipe.finetune_steps
    run_dir = root / "runs" / "nll-s0"
    prepared = recipe.prepared(model, root / "train.jsonl", root / "heldout.jsonl")
    return run_dir, recipe.finetune_overrides(prepared, Run("nll-s0", Setting("nll", loss), seed, True), run_dir)


def _trained(root, steps: int, final: bool = True, **run):
    """A run directory as the trainer leaves it after ``steps`` steps of this fine-tune: a complete
    checkpoint with the config and experiment fingerprint ``Checkpointer.save`` writes, and an export."""
    import yaml

    from recall_dist.configtree import to_dict
    from recall_dist.demo.fortunes import CONFIG_DIR
    from recall_dist.train.config import load_train_config
    from recall_dist.train.rundir.experiment import FINGERPRINT, config_fingerprint

    run_dir, overrides = _overrides(root, **run)
    config = to_dict(load_train_config(CONFIG_DIR / "finetune.yaml", overrides))
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (ckpt / FINGERPRINT).write_text(json.dumps(config_fingerprint(config)))
    (ckpt / "COMPLETE").write_text(f"{steps}\n")
    if final:
        (run_dir / "final").mkdir()
        (run_dir / "final" / "config.json").write_text("{}")
    return run_dir


def test_resume_reuses_only_the_same_finished_fine_tune(tmp_path):
    """``demo-text --resume`` keeps a fine-tune only when it is this one and it finished: same model,
    loss, data, seed, all its steps, exported.  Each other case is trained again."""
    from recall_dist.demo.fortunes import CONFIG_DIR
    from recall_dist.demo.pipeline import finished_run

    config = CONFIG_DIR / "finetune.yaml"
    steps = FortunesRecipe.quick().finetune_steps
    cases = {  # case: (how the run was trained, what this call asks for, reused?)
        "same": ({}, {}, True),
        "another seed": ({}, {"seed": 1}, False),
        "another loss": ({}, {"loss": "cdiv"}, False),
        "another model": ({}, {"model": "/models/other"}, False),
        "more steps wanted": ({}, {"steps": steps + 1}, False),
        "killed before the export": ({"final": False}, {}, False),
        "killed mid-run": ({"steps": 1}, {}, False),
    }
    for case, (made, asked, expected) in cases.items():
        root = tmp_path / case.replace(" ", "_")
        run_dir = _trained(root, **{"steps": steps, **made})
        assert finished_run(run_dir, config, _overrides(root, **asked)[1], asked.get("steps", steps)) is expected, case
    run_dir = _trained(tmp_path / "torn", steps)  # a checkpoint whose save did not complete
    (run_dir / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").unlink()
    assert not finished_run(run_dir, config, _overrides(tmp_path / "torn")[1], steps)
