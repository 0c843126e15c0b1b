"""The README's commands and code are real: referenced files exist, sub-commands are known, config
commands validate, the custom-rule example runs, and the cheap commands run for real."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def commands():
    out = []
    for block in blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_readme_starts_with_the_two_commands():
    first = blocks("bash")[0]
    assert "make demo" in first and "make test" in first
    assert README.index("make demo") < README.index("## How the losses work")


def test_every_referenced_file_exists():
    missing = []
    for cmd in commands():
        for tok in shlex.split(cmd):
            is_path = re.fullmatch(r"(configs|slurm|launch|benchmarks|tests)/[\w./-]+\.(yaml|sh|py|json)", tok)
            if is_path and not (ROOT / tok).exists():
                missing.append((cmd, tok))
    assert not missing, missing


def test_recall_dist_subcommands_are_known():
    from recall_dist.cli import COMMANDS

    for cmd in commands():
        m = re.search(r"(?:recall-dist|-m recall_dist) (\w+)", cmd)
        if m:
            assert m.group(1) in COMMANDS, cmd


def _run(args, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "recall_dist", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("cmd", [c for c in commands() if re.search(r"(recall-dist|-m recall_dist) train", c)])
def test_train_commands_validate(cmd):
    """Every config + overrides builds a valid config tree; local ones also pass the full ``--check``
    (tokenizer and vocabulary; hub models cannot be reached offline)."""
    from recall_dist.train.config import load_train_config

    args = shlex.split(cmd)
    config, overrides = args[args.index("train") + 1], args[args.index("train") + 2 :]
    cfg = load_train_config(str(ROOT / config), overrides)
    assert cfg.loss.name in ("nll", "cdiv", "truncr", "lambda_pr", "truncp")
    if "tiny" in config:
        proc = _run([*args[args.index("train") :], "--check"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "config OK" in proc.stdout


@pytest.mark.parametrize("cmd", [c for c in commands() if "recall-dist plan" in c])
def test_plan_commands_run(cmd):
    proc = _run(shlex.split(cmd)[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GiB" in proc.stdout


def test_custom_rule_example_runs():
    code = next(b for b in blocks("python") if "register_rule" in b)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    import torch

    from recall_dist import fused_linear_loss

    loss = namespace["loss"]
    h, w, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64), torch.arange(6)
    out = fused_linear_loss(h, w, y, loss)
    nll = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="none")
    weight = (1 - torch.exp(-nll)) ** 1.0
    assert float(out.loss) == pytest.approx(float((weight * nll).sum() / weight.sum()))


def test_demo_text_table_is_the_shipped_sweep():
    """The README's demo-text table (mean Precision / Recall over seeds, Recall's min and max) is what
    docs/demo-text/sweep.csv holds, recomputed here with the standard library."""
    import csv
    import statistics

    points: dict[str, dict[float, list[tuple[float, float]]]] = {}
    with open(ROOT / "docs" / "demo-text" / "sweep.csv") as f:
        for row in csv.DictReader(f):
            loss = re.sub(r"-s\d+$", "", row["model"])
            points.setdefault(loss, {}).setdefault(float(row["temperature"]), []).append(
                (float(row["precision"]), float(row["recall"]))
            )
    header = next(line for line in README.splitlines() if line.startswith("| loss | T=0.6"))
    temps = [float(c.strip()[2:]) for c in header.strip("|").split("|")[1:]]
    names = {
        "nll": "nll",
        "cdiv α=1.4": "cdiv-1.4",
        "cdiv α=2.0": "cdiv-2.0",
        "truncr": "truncr",
        "lambda_pr": "lambda_pr",
    }
    lines = README.splitlines()
    start = lines.index(header) + 2
    checked = 0
    for line in lines[start : start + len(names)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        loss = names[cells[0]]
        for t, cell in zip(temps, cells[1:], strict=True):
            ps, rs = zip(*points[loss][t], strict=True)
            want = f"{statistics.mean(ps):.3f} / {statistics.mean(rs):.3f} [{min(rs):.2f}, {max(rs):.2f}]"
            assert cell == want, (loss, t)
            checked += 1
    assert checked == 5 * 6 and all(len(v) == 3 for pts in points.values() for v in pts.values())
