"""``recall-dist demo --quick`` end to end (real torchrun x 2 training and sweep, CI-sized), and the
summary's statements checked against ``sweep.csv`` by an independent re-computation.

The summary logic is also tested on hand-made curves whose verdicts are known by construction
(tests/demo/test_report.py); the runner's argument checks and recipe in tests/demo/test_runner.py.
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
from recall_dist.demo import verdicts

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
    recipe = demo.ProductRecipe.quick()
    for name in ("pr_curve.png", "pr_curve_zoom.png", "sweep.csv", "summary.md"):
        assert (quick_demo / name).is_file(), name
    rows = _rows(quick_demo / "sweep.csv")
    models = [s.name for s in recipe.losses]
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
    rose = best_above > recall_1 + verdicts.TOLERANCE
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
            [(p, r) for _, p, r in sorted(curves["cdiv-1.4"])], p_i - verdicts.PRECISION_TOLERANCE
        )
        gaps.append((0.0 if math.isnan(best) else best) - _dense_recall_at_precision([(p, r) for _, p, r in nll], p_i))
    above = sum(g > verdicts.TOLERANCE + 1e-6 for g in gaps)
    below = sum(g < -verdicts.TOLERANCE - 1e-6 for g in gaps)
    verdict = "dominates" if above and not below else ("does not dominate" if not above else "mixed")
    if not any(abs(abs(g) - verdicts.TOLERANCE) < 1e-5 for g in gaps):  # away from the tie threshold
        assert re.search(rf"\*\*cdiv-1\.4\*\* vs NLL \+ temperature: \*\*{verdict}\*\*", text), text


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
    labels = {(r["model"], r["family"], r["seed"]) for r in _rows(out / "sweep.csv")}  # the seed is a column
    assert labels == {("nll", "nll", "0"), ("nll-s1", "nll", "1"), ("cdiv-1.4", "cdiv-1.4", "0")} | {
        ("cdiv-1.4-s1", "cdiv-1.4", "1")
    }
    assert "seed" not in _rows(quick_demo / "sweep.csv")[0]  # one seed: no label columns
    text = (out / "summary.md").read_text()
    stats = verdicts.seed_statistics(verdicts.read_families(out / "sweep.csv"), "nll", demo_report.PRECISION_LEVELS)
    cells = [verdicts.spread([s["recall_at"][0.9] for s in stats["cdiv-1.4"].values()])]
    assert f"| cdiv-1.4 | {cells[0]} |" in text
