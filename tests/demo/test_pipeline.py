"""recall_dist/demo/pipeline.py without running a stage: the one recipe shape both demos share (fields,
``full`` / ``quick``), the fine-tunes a recipe asks for and their seeds, and the sweep's model entries,
which carry each fine-tune's seed as a field (``ModelSpec.seed`` / ``family``) instead of in its name.
The stages end to end: tests/e2e/test_demo.py."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from recall_dist.configtree import load_config, load_yaml
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
        ("nll", "nll", 0),
        ("cdiv-1.4", "cdiv-1.4", 0),
        ("nll-s1", "nll", 1),
        ("cdiv-1.4-s1", "cdiv-1.4", 1),
    ]
    assert runs[0].model_entry("/m") == "{name: nll, path: /m, family: nll, seed: 0}"  # seed 0: the bare name
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


def test_a_setting_with_its_own_steps_and_lr_trains_them_and_is_read_against_nll_trained_alike():
    Setting = pipeline.Setting
    losses = [
        *pipeline.LOSSES[:2],
        Setting("nll-9steps", "nll", steps=9),
        Setting("cdiv-1.1-9steps", "cdiv", {"alpha": 1.1}, steps=9),
        Setting("nll-lr3e-05", "nll", lr=3e-5),
        Setting("cdiv-1.4-lr3e-05", "cdiv", {"alpha": 1.4}, lr=3e-5),
    ]
    recipe = dataclasses.replace(ProductRecipe.full(), losses=losses, seeds=2)
    runs = recipe.runs()
    assert [(r.name, r.steps, r.lr) for r in runs[6:]] == [
        ("nll-s1", None, None),
        ("cdiv-1.4-s1", None, None),
        ("nll-9steps-s1", 9, None),
        ("cdiv-1.1-9steps-s1", 9, None),
        ("nll-lr3e-05-s1", None, 3e-5),
        ("cdiv-1.4-lr3e-05-s1", None, 3e-5),
    ]
    assert [recipe.steps_of(r) for r in runs[:6]] == [recipe.finetune_steps] * 2 + [9, 9] + [recipe.finetune_steps] * 2
    assert recipe.max_steps() == max(9, recipe.finetune_steps)
    config_lr = float(load_yaml(ProductRecipe.CONFIG_DIR / "finetune.yaml")["optim"]["lr"])
    assert [recipe.lr_of(r) for r in runs[:6]] == [config_lr] * 4 + [3e-5] * 2
    prepared = pipeline.Prepared(model="/pretrained")
    overrides = recipe.finetune_overrides(prepared, runs[3], recipe.out / "runs" / runs[3].name)
    assert "train.max_steps=9" in overrides and f"data.num_samples={9 * recipe.global_batch}" in overrides
    assert "loss.params={alpha: 1.1}" in overrides and not any(o.startswith("optim.lr=") for o in overrides)
    overrides = recipe.finetune_overrides(prepared, runs[5], recipe.out / "runs" / runs[5].name)
    assert overrides[-1] == "optim.lr=3e-05"  # last: over whatever a config fragment (lora.yaml) set
    # each loss against NLL trained alike; NLL at the config's steps and lr is the reference itself
    assert pipeline.references(losses) == {
        "cdiv-1.4": "nll",
        "nll-9steps": "nll",
        "cdiv-1.1-9steps": "nll-9steps",
        "nll-lr3e-05": "nll",
        "cdiv-1.4-lr3e-05": "nll-lr3e-05",
    }
    lone = [pipeline.LOSSES[0], Setting("cdiv-1.1-9steps", "cdiv", {"alpha": 1.1}, steps=9, lr=1e-5)]
    with pytest.raises(pipeline.DemoError, match=r"trains 9 steps at lr 1e-05 and no NLL setting does: add Setting"):
        pipeline.references(lone)
    assert pipeline.references(lone, strict=False) == {}  # a report of what an interrupted call finished
    assert Setting("x", "cdiv", lr=1e-5, steps=9).nll_reference() == Setting(
        "nll-lr1e-05-9steps", "nll", lr=1e-5, steps=9
    )
    with pytest.raises(pipeline.DemoError, match="a demo's losses are Settings"):
        pipeline.seed_runs([("nll", "nll", {})], 1)
    with pytest.raises(pipeline.DemoError, match="'nll-long': steps = 0; expected a positive integer"):
        Setting("nll-long", "nll", steps=0)
    with pytest.raises(pipeline.DemoError, match=r"'nll-fast': lr = -1\.0; expected a positive number"):
        Setting("nll-fast", "nll", lr=-1.0)


def test_common_options(tmp_path):
    args = argparse.Namespace(quick=True, steps=0, seeds=1, out=None)
    assert pipeline.recipe_from_args(ProductRecipe, args) == "--steps = 0: must be >= 1"
    args = argparse.Namespace(quick=True, steps=3, seeds=2, out=str(tmp_path / "x"))
    recipe = pipeline.recipe_from_args(FortunesRecipe, args)
    assert (recipe.finetune_steps, recipe.seeds, recipe.out) == (3, 2, tmp_path / "x")
    recipe = pipeline.recipe_from_args(FortunesRecipe, argparse.Namespace(quick=False, steps=None, seeds=1, out=None))
    assert recipe.out.is_absolute() and recipe.out.name == "demo-text"


def test_lora_option_reaches_every_fine_tune_config(monkeypatch, tmp_path):
    """``recall-dist demo-text --lora``: every fine-tune's config gets ``configs/demo_text/lora.yaml``'s
    ``model.lora`` (merged on export, so the sweep loads ``final/`` like a full fine-tune's) and learning
    rate, the results go to ``results/demo-text-lora``; without it the fine-tunes train every weight.  A
    LoRA fine-tune is another experiment than the full one (its fingerprint differs: ``--resume`` never
    mixes them)."""
    from recall_dist.configtree import to_dict
    from recall_dist.demo import fortunes
    from recall_dist.train.config import load_train_config
    from recall_dist.train.rundir.experiment import config_fingerprint, fingerprint_differences

    ran = []
    monkeypatch.setattr(pipeline, "run_command", lambda recipe, resume: ran.append(recipe) or 0)
    assert fortunes.main(["--lora", "--quick"]) == 0
    assert fortunes.main(["--quick", "--out", str(tmp_path)]) == 0
    lora, full = ran
    assert lora.lora and lora.out.name == "demo-text-lora" and lora.out.is_absolute()
    assert not full.lora and full.out == tmp_path
    prepared = lora.prepared("/models/smollm2", tmp_path / "train.jsonl", tmp_path / "heldout.jsonl")
    configs = {}
    for recipe in (lora, full):
        for run in recipe.runs():
            overrides = recipe.finetune_overrides(prepared, run, recipe.out / "runs" / run.name)
            configs[recipe.lora, run.name] = load_train_config(FortunesRecipe.CONFIG_DIR / "finetune.yaml", overrides)
    assert len(configs) == 2 * len(pipeline.LOSSES[:2])
    for (is_lora, name), cfg in configs.items():
        if is_lora:
            lora_cfg = cfg.model.lora
            assert (lora_cfg.r, lora_cfg.alpha, lora_cfg.target_modules) == (16, 32, "all-linear"), name
            assert lora_cfg.merge_on_export and cfg.optim.lr == pytest.approx(2e-4)
        else:
            assert cfg.model.lora is None and cfg.optim.lr == pytest.approx(2e-5)
    nll = [config_fingerprint(to_dict(configs[is_lora, "nll"])) for is_lora in (True, False)]
    assert any(d.startswith("model.lora") for d in fingerprint_differences(*nll))


def test_config_overrides_round_trip_a_fragment(tmp_path):
    """``config_overrides``: each key of each section as ``section.key=value``, values that read back equal
    (a float like 1e-05 stays a float, lists and mappings in flow style)."""
    import yaml

    fragment = {"optim": {"lr": 1e-5, "name": "adam"}, "model": {"lora": {"r": 8, "target_modules": ["q_proj"]}}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(fragment))
    overrides = pipeline.config_overrides(tmp_path / "f.yaml")
    from recall_dist.configtree import apply_overrides

    assert apply_overrides({}, overrides) == fragment


def test_stage_progress_is_read_from_the_stage_s_own_bar(tmp_path):
    """The progress a demo stage prints is its own bar's last update, not Hugging Face's weight-loading bar
    that the sweep's model loads write after it (Gemma 3: "236/236" tensors read as the sweep's progress)."""
    from recall_dist.demo.stages import _tqdm_progress

    log = tmp_path / "sweep.log"
    assert _tqdm_progress(log) == ""  # no log yet
    log.write_text(
        "sweep shard 1/2:   3%|3         | 4/144 [00:36<20:10,  8.65s/item]\r"
        "sweep shard 1/2:   3%|3         | 5/144 [00:49<23:56, 10.33s/item]\n"
        "Loading weights:   0%|          | 0/236 [00:00<?, ?it/s]\r"
        "Loading weights: 100%|##########| 236/236 [00:00<00:00, 846.20it/s]\n"
    )
    assert _tqdm_progress(log) == "5/144"
    log.write_text(log.read_text() + "sweep shard 1/2:   4%|4         | 6/144 [00:54<19:30,  8.48s/item]")
    assert _tqdm_progress(log) == "6/144"
    log.write_text("Loading weights: 100%|##########| 236/236 [00:00<00:00, 846.20it/s]\n")
    assert _tqdm_progress(log) == ""
