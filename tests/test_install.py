"""recall_dist installs like a library: a non-editable wheel in a fresh virtualenv, run from outside the
source tree, finds its presets (model architectures, DeepSpeed JSON) as package data, plans a 7B run and
trains the tiny model; the demos find their configs (``recall_dist/demo/configs/``) inside the package.
The new venv borrows the heavy dependencies (torch, deepspeed, transformers, ...) from the test's own
environment through a .pth file; recall_dist itself comes only from the wheel."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root), str(REPO)], root)
    (wheel,) = root.glob("recall_dist-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], root)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout
    deps = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    Path(purelib.strip(), "borrowed_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], root)
    return venv


def test_wheel_holds_the_presets_and_runs_outside_the_tree(installed, tmp_path):
    python, cli = installed / "bin" / "python", installed / "bin" / "recall-dist"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH="")
    where = _run([str(python), "-c", "import recall_dist, sys; print(recall_dist.__file__)"], work, env).stdout
    assert str(installed) in where and str(REPO) not in where  # the wheel's copy, not the checkout
    # plan: a 7B preset named in a config written here (no configs/ directory in sight)
    config = work / "plan.yaml"
    config.write_text(yaml.safe_dump({"model": "llama2-7b", "backend": {"name": "deepspeed", "zero_stage": 3}}))
    out = _run([str(cli), "plan", str(config), "--gpus-per-node", "8", "--json"], work, env).stdout
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["total_params"] == 6_738_415_616 and plan["fits"] is True
    # train: the tiny preset, the DeepSpeed JSON preset, a few steps
    tiny = {
        "model": "tiny-llama",
        "data": {"source": "synthetic:product", "task_params": {"max_factor": 9}, "num_samples": 64},
        "backend": {"name": "deepspeed", "zero_stage": 2},
        "train": {"output_dir": str(work / "run"), "micro_batch_size": 8, "max_steps": 3, "progress_bar": False},
    }
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny))
    _run([str(cli), "train", str(config)], work, env)
    assert (work / "run" / "final" / "config.json").is_file()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 4  # the run's header, 3 steps


def test_wheel_holds_the_demo_configs(installed, tmp_path):
    """The demos' recipes (``ProductRecipe.full()``, ``FortunesRecipe.full()``) read the YAML files shipped in the
    installed package, and the pre-training config's model file, named relative to it, is found there."""
    python, cli = installed / "bin" / "python", installed / "bin" / "recall-dist"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH="")
    probe = (
        "import json; from recall_dist.demo import runner, fortunes; "
        "r, t = runner.ProductRecipe.full(), fortunes.FortunesRecipe.full(); "
        "print(json.dumps({'demo': str(runner.CONFIG_DIR), 'text': str(fortunes.CONFIG_DIR), "
        "'temperatures': r.temperatures, 'finetune_steps': r.finetune_steps, 'text_temperatures': t.temperatures, "
        "'num_texts': t.num_texts}))"
    )
    found = json.loads(_run([str(python), "-c", probe], work, env).stdout.strip().splitlines()[-1])
    source = REPO / "recall_dist" / "demo" / "configs"
    for key, name in (("demo", "demo"), ("text", "demo_text")):
        shipped = Path(found[key])
        assert str(installed) in str(shipped) and str(REPO) not in str(shipped) and shipped.name == name
        assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in (source / name).glob("*.yaml"))
    sweep, finetune = (yaml.safe_load((source / "demo" / f).read_text()) for f in ("sweep.yaml", "finetune.yaml"))
    assert found["temperatures"] == sweep["temperatures"] and found["finetune_steps"] == finetune["train"]["max_steps"]
    text_sweep = yaml.safe_load((source / "demo_text" / "sweep.yaml").read_text())
    assert found["text_temperatures"] == text_sweep["temperatures"]
    assert found["num_texts"] == text_sweep["text"]["num_texts"]
    # pretrain.yaml names tiny-llama-h64.yaml relative to itself: the installed copy plans like the source's
    args = ["plan", "--json"]
    out = _run([str(cli), *args, str(Path(found["demo"]) / "pretrain.yaml")], work, env).stdout
    ref = _run([sys.executable, "-m", "recall_dist", *args, str(source / "demo" / "pretrain.yaml")], REPO, env).stdout
    params = [json.loads(o.strip().splitlines()[-1])["total_params"] for o in (out, ref)]
    assert params[0] == params[1] > 0
    for command in ("demo", "demo-text"):  # both commands start from the installed package
        assert "recall-dist " + command in _run([str(cli), command, "--help"], work, env).stdout
