"""recall_dist/demo/pipeline.py without running a stage: the one recipe shape both demos share (fields,
``full`` / ``quick``), the fine-tunes a recipe asks for and their seeds, and the sweep's model entries,
which carry each fine-tune's seed as a field (``ModelSpec.seed`` / ``family``) instead of in its name.
The stages end to end: tests/e2e/test_demo.py."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from recall_dist.configtree import load_config
from recall_dist.demo import pipeline
from recall_dist.demo.fortunes import FortunesRecipe
from recall_dist.demo.runner import ProductRecipe
from recall_dist.eval.config import SweepConfig

RECIPES = (ProductRecipe, FortunesRecipe)


@pytest.mark.parametrize("recipe_cls", RECIPES)
def test_every_demo_has_the_one_recipe_shape(recipe_cls):
    shared = {f.name for f in dataclasses.fields(pipeline.Recipe)}
    assert issubclass(recipe_cls, pipeline.Recipe) and shared <= {f.name for f in dataclasses.fields(recipe_cls)}
    full, quick = recipe_cls.full(), recipe_cls.quick()
    assert full.losses == pipeline.LOSSES and quick.losses == pipeline.LOSSES[:2]
    assert str(full.out) == recipe_cls.OUT and full.model is None and full.seeds == 1
    for key, value in recipe_cls.QUICK.items():
        assert getattr(quick, key) == value, key
    quick.temperatures.append(9.0)  # a recipe owns its lists: the next quick() is as before
    assert recipe_cls.quick().temperatures == recipe_cls.QUICK["temperatures"]
    assert 9.0 not in recipe_cls.QUICK["temperatures"]


def test_runs_name_every_seed_and_label_them():
    runs = pipeline.seed_runs(pipeline.LOSSES[:2], 2)
    assert [(r.name, r.family, r.seed) for r in runs] == [
        ("nll-s0", "nll", 0),
        ("cdiv-1.4-s0", "cdiv-1.4", 0),
        ("nll-s1", "nll", 1),
        ("cdiv-1.4-s1", "cdiv-1.4", 1),
    ]
    assert runs[0].model_entry("/m") == "{name: nll-s0, path: /m, family: nll, seed: 0}"
    (one,) = pipeline.seed_runs(pipeline.LOSSES[:1], 1)
    assert one.model_entry("/m") == "{name: nll, path: /m}"  # one seed: the sweep and its csv as before


def test_sweep_models_carry_the_seed_field(tmp_path):
    recipe = ProductRecipe.quick()
    recipe.seeds, recipe.out = 2, tmp_path
    runs = recipe.runs()
    for run in runs:  # the sweep config checks that every model path exists
        (tmp_path / "runs" / run.name / "final").mkdir(parents=True)
    prepared = pipeline.Prepared(model="/pretrained", sweep=["recall_at_n=50", "num_samples=0"])
    cfg = load_config(SweepConfig, ProductRecipe.CONFIG_DIR / "sweep.yaml", recipe.sweep_overrides(prepared, runs))
    assert [(m.name, m.family, m.seed) for m in cfg.models] == [(r.name, r.family, r.seed) for r in runs]
    assert cfg.temperatures == recipe.temperatures and cfg.output_dir == str(tmp_path)


def test_finetune_overrides_shift_the_seeds_by_the_run():
    recipe = ProductRecipe.full()
    prepared = pipeline.Prepared(model="/pretrained", finetune=["model.name_or_path=/pretrained"])
    run = pipeline.seed_runs(pipeline.LOSSES[1:2], 3)[2]
    overrides = recipe.finetune_overrides(prepared, run, recipe.out / "runs" / run.name)
    assert overrides[0] == "model.name_or_path=/pretrained"
    assert f"train.seed={recipe.train_seed + 2}" in overrides and f"data.seed={recipe.data_seed + 2}" in overrides
    assert "loss.name=cdiv" in overrides and "loss.params={alpha: 1.4}" in overrides
    assert f"data.num_samples={recipe.finetune_steps * recipe.global_batch}" in overrides
    # a recipe without a data seed (fortunes: a fixed corpus) leaves the config's data seed alone
    text = FortunesRecipe.full()
    assert not any(o.startswith("data.seed=") for o in text.finetune_overrides(prepared, run, text.out))


def test_common_options(tmp_path):
    args = argparse.Namespace(quick=True, steps=0, seeds=1, out=None)
    assert pipeline.recipe_from_args(ProductRecipe, args) == "--steps = 0: must be >= 1"
    args = argparse.Namespace(quick=True, steps=3, seeds=2, out=str(tmp_path / "x"))
    recipe = pipeline.recipe_from_args(FortunesRecipe, args)
    assert (recipe.finetune_steps, recipe.seeds, recipe.out) == (3, 2, tmp_path / "x")
    recipe = pipeline.recipe_from_args(FortunesRecipe, argparse.Namespace(quick=False, steps=None, seeds=1, out=None))
    assert recipe.out.is_absolute() and recipe.out.name == "demo-text"
