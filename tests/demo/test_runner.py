"""``recall-dist demo --quick`` end to end (real torchrun x 2 training and sweep, CI-sized), and the
summary's statements checked against ``sweep.csv`` by an independent re-computation.

The summary logic is also tested on hand-made curves whose verdicts are known by construction.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recall_dist.demo import report as demo_report
from recall_dist.demo import runner as demo

REPO = Path(__file__).resolve().parents[2]


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _dense_recall_at_precision(points, min_precision: float) -> float:
    """Reference for the interpolated Recall at Precision >= p: walk every segment of the T-ordered
    curve on a fine grid (no crossing formula), keep the best Recall whose Precision qualifies."""
    best = -math.inf
    for (p0, r0), (p1, r1) in zip(points, points[1:] or points, strict=False):
        s = np.linspace(0.0, 1.0, 200001)
        p, r = p0 + s * (p1 - p0), r0 + s * (r1 - r0)
        ok = p >= min_precision - 1e-12
        if ok.any():
            best = max(best, float(r[ok].max()))
    return best if best > -math.inf else math.nan


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "recall_dist", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pre-train NLL" in proc.stdout and "fine-tune cdiv-1.4" in proc.stdout  # progress is shown
    return out


@pytest.mark.slow
def test_quick_demo_writes_the_three_files(quick_demo: Path):
    recipe = demo.Recipe.quick()
    for name in ("pr_curve.png", "pr_curve_zoom.png", "sweep.csv", "summary.md"):
        assert (quick_demo / name).is_file(), name
    rows = _rows(quick_demo / "sweep.csv")
    models = [name for name, *_ in recipe.losses]
    assert sorted((r["model"], float(r["temperature"])) for r in rows) == sorted(
        (m, t) for m in models for t in recipe.temperatures
    )
    for r in rows:
        assert 0.0 <= float(r["precision"]) <= 1.0 + 1e-9 and 0.0 <= float(r["recall"]) <= 1.0 + 1e-9
    with Image.open(quick_demo / "pr_curve.png") as image:
        image.verify()
    with Image.open(quick_demo / "pr_curve.png") as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 400


@pytest.mark.slow
def test_summary_statements_follow_from_the_csv(quick_demo: Path):
    text = (quick_demo / "summary.md").read_text()
    rows = _rows(quick_demo / "sweep.csv")
    curves: dict[str, list] = {}
    for r in rows:
        curves.setdefault(r["model"], []).append((float(r["temperature"]), float(r["precision"]), float(r["recall"])))
    nll = sorted(curves["nll"])

    # The temperature statement: Recall at T=1, whether any T > 1 beats it, the argmax T.
    recall_1 = next(r for t, _, r in nll if t == 1.0)
    best_above = max(r for t, _, r in nll if t > 1.0)
    argmax_t = max(nll, key=lambda x: x[2])[0]
    rose = best_above > recall_1 + demo_report.TOLERANCE
    assert (f"**Yes, by {best_above - recall_1:+.3f}**" if rose else "**No**") in text
    assert f"NLL's Recall is {recall_1:.3f} at T=1" in text
    assert f"peaks at T={argmax_t:g}" in text

    # The table: Recall at Precision >= 0.9 of every model, recomputed on a dense grid.
    for model, points in curves.items():
        pr = [(p, r) for _, p, r in sorted(points)]
        expected = _dense_recall_at_precision(pr, 0.9)
        line = next(line for line in text.splitlines() if line.startswith(f"| {model} |"))
        cell = line.split("|")[2].strip()
        if math.isnan(expected):
            assert cell == "n/a"
        else:
            assert abs(float(cell) - expected) <= 1.5e-3, (model, cell, expected)

    # The verdict of cdiv-1.4, recomputed from NLL's points with the dense reference.
    gaps = []
    for _, p_i, _ in nll:
        best = _dense_recall_at_precision(
            [(p, r) for _, p, r in sorted(curves["cdiv-1.4"])], p_i - demo_report.PRECISION_TOLERANCE
        )
        gaps.append((0.0 if math.isnan(best) else best) - _dense_recall_at_precision([(p, r) for _, p, r in nll], p_i))
    above = sum(g > demo_report.TOLERANCE + 1e-6 for g in gaps)
    below = sum(g < -demo_report.TOLERANCE - 1e-6 for g in gaps)
    verdict = "dominates" if above and not below else ("does not dominate" if not above else "mixed")
    if not any(abs(abs(g) - demo_report.TOLERANCE) < 1e-5 for g in gaps):  # away from the tie threshold
        assert re.search(rf"\*\*cdiv-1\.4\*\* vs NLL \+ temperature: \*\*{verdict}\*\*", text), text


def test_summary_markdown_names_every_model_and_needs_nll():
    curves = {"nll": [(0.5, 0.99, 0.5), (1.0, 0.95, 0.6)], "cdiv-1.4": [(0.5, 0.995, 0.6), (1.0, 0.96, 0.7)]}
    text = demo_report.summary_markdown(curves)
    assert "| cdiv-1.4 |" in text and "**dominates**" in text
    with pytest.raises(ValueError, match="no 'nll' model"):
        demo_report.summary_markdown({"cdiv-1.4": curves["cdiv-1.4"]})


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

    recipe = demo.Recipe.full()
    sweep = load_yaml(demo.CONFIG_DIR / "sweep.yaml")
    finetune = load_yaml(demo.CONFIG_DIR / "finetune.yaml")
    assert recipe.temperatures == sweep["temperatures"] and recipe.recall_at_n == sweep["recall_at_n"]
    assert recipe.finetune_steps == finetune["train"]["max_steps"]
    assert recipe.max_factor == finetune["data"]["task_params"]["max_factor"] == sweep["task_params"]["max_factor"]
    recipe.seeds = 3
    runs = recipe.runs()
    assert len(runs) == 3 * len(recipe.losses) and len({name for name, *_ in runs}) == len(runs)
    assert {seed for *_, seed in runs} == {0, 1, 2} and runs[-1][0] == f"{recipe.losses[-1][0]}-s2"


# Three seeds of hand-made curves: cdiv is above NLL at every level in every seed; "flat" ties NLL.
SEEDED = {}
for _s, _shift in enumerate((0.0, 0.01, -0.01)):
    SEEDED[f"nll-s{_s}"] = [(0.5, 0.999, 0.50 + _shift), (1.0, 0.99, 0.60 + _shift), (2.0, 0.90, 0.55 + _shift)]
    SEEDED[f"cdiv-s{_s}"] = [(0.5, 0.999, 0.56 + _shift), (1.0, 0.992, 0.66 + 2 * _shift), (2.0, 0.93, 0.62)]
    SEEDED[f"flat-s{_s}"] = list(SEEDED[f"nll-s{_s}"])


def test_seed_statistics_pair_each_seed_with_its_nll():
    stats = demo_report.seed_statistics(SEEDED, levels=(0.99, 0.999))
    assert set(stats) == {"nll", "cdiv", "flat"} and set(stats["cdiv"]) == {0, 1, 2}
    for seed, shift in enumerate((0.0, 0.01, -0.01)):
        cdiv = stats["cdiv"][seed]
        # NLL reaches 0.999 only at T = 0.5 and 0.99 at T <= 1 (best 0.60 + shift); cdiv at 0.99: T <= 1.
        assert cdiv["recall_at"][0.99] == pytest.approx(0.66 + 2 * shift)
        assert cdiv["margin"][0.99] == pytest.approx(0.06 + shift)
        assert cdiv["margin"][0.999] == pytest.approx(0.06)
        assert cdiv["verdict"] == "dominates" and stats["flat"][seed]["verdict"] == "does not dominate"
        assert stats["nll"][seed]["margin"][0.99] == 0.0


def test_seeds_markdown_reports_mean_and_range():
    text = demo_report.seeds_markdown(SEEDED, levels=(0.99, 0.999))
    assert "| cdiv | 0.660 [0.640, 0.680] | 0.560 [0.550, 0.570] |" in text
    assert "| cdiv | +0.060 [+0.050, +0.070] | +0.060 [+0.060, +0.060] | 3 of 3 |" in text
    assert "- **cdiv**: above NLL by more than 0.002 in every seed at P >= 0.99, 0.999." in text
    assert "- **flat**: no level where every seed" in text
    with pytest.raises(ValueError, match="lacks seed"):
        demo_report.seed_statistics({k: v for k, v in SEEDED.items() if k != "cdiv-s2"})


@pytest.mark.slow
def test_quick_demo_with_seeds_reuses_a_pretrained_model(quick_demo: Path, tmp_path):
    out = tmp_path / "seeds"
    proc = subprocess.run(
        [sys.executable, "-m", "recall_dist", "demo", "--quick", "--seeds", "2", "--out", str(out),
         "--pretrained", str(quick_demo / "runs" / "pretrain" / "final")],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pre-train NLL" not in proc.stdout and "fine-tune cdiv-1.4-s1" in proc.stdout
    models = {r["model"] for r in _rows(out / "sweep.csv")}
    assert models == {"nll-s0", "nll-s1", "cdiv-1.4-s0", "cdiv-1.4-s1"}
    text = (out / "summary.md").read_text()
    stats = demo_report.seed_statistics(demo_report.read_curves(out / "sweep.csv"))
    cells = [demo_report.spread([s["recall_at"][0.9] for s in stats["cdiv-1.4"].values()])]
    assert f"| cdiv-1.4 | {cells[0]} |" in text
