"""recall_dist/demo/runner.py without running it: bad arguments exit 2 with a message naming the option,
and the recipe (``ProductRecipe.full()``) is read from the demo's own configs.  ``recall-dist demo --quick`` end
to end (real torchrun training and sweep): tests/e2e/test_demo.py."""

from __future__ import annotations

from recall_dist.demo import runner as demo


def test_bad_arguments_exit_2(capsys):
    assert demo.main(["--steps", "0"]) == 2
    assert "--steps = 0" in capsys.readouterr().err


def test_bad_pretrained_and_seeds_exit_2(tmp_path, capsys):
    assert demo.main(["--seeds", "0"]) == 2
    assert "--seeds = 0" in capsys.readouterr().err
    assert demo.main(["--pretrained", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_recipe_comes_from_the_demo_configs():
    from recall_dist.configtree import load_yaml

    recipe = demo.ProductRecipe.full()
    sweep = load_yaml(demo.CONFIG_DIR / "sweep.yaml")
    finetune = load_yaml(demo.CONFIG_DIR / "finetune.yaml")
    assert recipe.temperatures == sweep["temperatures"] and recipe.recall_at_n == sweep["recall_at_n"]
    assert recipe.finetune_steps == finetune["train"]["max_steps"]
    assert recipe.max_factor == finetune["data"]["task_params"]["max_factor"] == sweep["task_params"]["max_factor"]
    recipe.seeds = 3
    runs = recipe.runs()
    assert len(runs) == 3 * len(recipe.losses) and len({run.name for run in runs}) == len(runs)
    assert {run.seed for run in runs} == {0, 1, 2} and runs[-1].name == f"{recipe.losses[-1].name}-s2"
    assert recipe.data_seed == finetune["data"]["seed"] and recipe.train_seed == finetune["train"]["seed"]
