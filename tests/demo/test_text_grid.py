"""``recall-dist demo-text --grid`` (``demo/text_grid.py``): the command reaches the grid, every point has its
NLL reference, each point's lr and steps reach the real training config, and the ties are the demo's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recall_dist.demo.fortunes import CONFIG_DIR, FortunesRecipe
from recall_dist.demo.fortunes_report import tie_tolerance
from recall_dist.demo.pipeline import Prepared, references
from recall_dist.demo.text_grid import BANDS, POINTS, TextGridRecipe


def _recipe(tmp_path) -> TextGridRecipe:
    base = FortunesRecipe.full()
    return TextGridRecipe(
        finetune_steps=base.finetune_steps,
        global_batch=base.global_batch,
        temperatures=base.temperatures,
        num_texts=base.num_texts,
        max_new_tokens=base.max_new_tokens,
        out=tmp_path,
    )


def test_points_references_and_tolerance(tmp_path):
    names = [p.name for p in POINTS]
    assert len(names) == len(set(names)) and set(references(POINTS).values()) <= set(names)
    recipe = _recipe(tmp_path)
    assert [p.name for p in recipe.points] == names  # the default grid
    assert recipe.tie() == pytest.approx(0.5 / 300**0.5) == tie_tolerance(300)
    assert all(lo < hi for lo, hi in BANDS) and list(BANDS) == sorted(BANDS)


def test_point_overrides_reach_the_training_config(tmp_path):
    from recall_dist.train.config import load_train_config

    recipe = _recipe(tmp_path)
    prepared = Prepared("/models/lm", finetune=["model.name_or_path=/models/lm", "data.source=x.jsonl"])
    by_name = {r.name: r for r in recipe.runs()}

    def cfg(name):
        overrides = recipe.finetune_overrides(prepared, by_name[name], tmp_path / name)
        return load_train_config(CONFIG_DIR / "finetune.yaml", overrides)

    centre, slow, longer = cfg("cdiv-1.4"), cfg("nll-lr2e-06"), cfg("cdiv-1.4-60steps")
    assert (centre.optim.lr, centre.train.max_steps, centre.data.num_samples) == (2e-5, 30, 30 * 32)
    assert (slow.optim.lr, slow.train.max_steps, slow.loss.name) == (2e-6, 30, "nll")
    assert (longer.optim.lr, longer.train.max_steps, longer.data.num_samples) == (2e-5, 60, 60 * 32)
    assert cfg("cdiv-1.4-maxw2").loss.params == {"alpha": 1.4, "max_weight": 2.0}


def test_the_command_reaches_the_grid():
    done = subprocess.run(
        [sys.executable, "-m", "recall_dist", "demo-text", "--grid", "--only", "cdiv-9"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "unknown grid point(s) cdiv-9" in done.stderr, done.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "recall_dist", "demo-text", "--grid", "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "recall-dist demo-text --grid" in help_text and "--only" in help_text
