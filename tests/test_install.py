"""recall_dist installs like a library: a non-editable wheel in a fresh virtualenv, run from outside the
source tree, finds its presets (model architectures, DeepSpeed JSON) as package data, plans a 7B run and
trains the tiny model.  The new venv borrows the heavy dependencies (torch, deepspeed, transformers, ...)
from the test's own environment through a .pth file; recall_dist itself comes only from the wheel."""

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
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 3
