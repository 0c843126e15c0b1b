"""``recall-dist demo-lm --grid`` (``demo/lm_grid.py``): which points run with which references, the
overrides each point's fine-tune gets (checked through the real config loader), the verdicts against worked
curves, and a ``--quick`` grid end to end on a tiny random Llama (real torchrun fine-tunes and sweeps)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from recall_dist.demo.iso import CONFIG_DIR, IsoRecipe
from recall_dist.demo.iso_report import TIE
from recall_dist.demo.lm_grid import BANDS, POINTS, LmGridRecipe
from recall_dist.demo.pipeline import DemoError, Prepared, Setting, references
from recall_dist.demo.recipe_grid import point_statistics, select, verdict
from tests.demo.test_iso import tiny_chat_model


def test_every_point_has_its_nll_reference_in_the_grid():
    names = {p.name for p in POINTS}
    refs = references(POINTS)  # raises for a point without one
    assert set(refs.values()) <= names and set(refs) == names - {"nll"}
    assert refs["cdiv-1.4-lr3e-05"] == "nll-lr3e-05" and refs["cdiv-1.1-112steps"] == "nll-112steps"
    assert refs["nll-112steps"] == "nll"  # what training longer does alone
    assert [p.name for p in select(POINTS, ["cdiv-1.4-112steps"])] == ["nll-112steps", "cdiv-1.4-112steps"]
    combined = select(POINTS, ["cdiv-1.4-maxw2-112steps"])  # a combination runs against NLL at its steps
    assert [p.name for p in combined] == ["nll-112steps", "cdiv-1.4-maxw2-112steps"]
    assert (combined[1].steps, combined[1].params) == (112, {"alpha": 1.4, "max_weight": 2.0})
    assert [p.name for p in select(POINTS, ["cdiv-1.1", "cdiv-1.2"])] == ["nll", "cdiv-1.1", "cdiv-1.2"]
    with pytest.raises(DemoError, match="unknown grid point"):
        select(POINTS, ["cdiv-9"])


def test_point_overrides_reach_the_training_config(tmp_path):
    from recall_dist.train.config import load_train_config

    base = IsoRecipe.full()
    recipe = LmGridRecipe(
        finetune_steps=base.finetune_steps, global_batch=base.global_batch, temperatures=base.temperatures, out=tmp_path
    )
    prepared = Prepared("/models/lm", finetune=["model.name_or_path=/models/lm", "data.source=x.jsonl"])
    by_name = {r.name: r for r in recipe.runs()}
    centre = load_train_config(
        CONFIG_DIR / "finetune.yaml", recipe.finetune_overrides(prepared, by_name["cdiv-1.4"], tmp_path / "a")
    )
    longer = load_train_config(
        CONFIG_DIR / "finetune.yaml", recipe.finetune_overrides(prepared, by_name["cdiv-1.4-112steps"], tmp_path / "b")
    )
    slower = load_train_config(
        CONFIG_DIR / "finetune.yaml", recipe.finetune_overrides(prepared, by_name["nll-lr3e-05"], tmp_path / "c")
    )
    assert (centre.train.max_steps, centre.data.num_samples, centre.optim.lr) == (56, 56 * 16, 1e-4)
    assert (longer.train.max_steps, longer.data.num_samples, longer.optim.lr) == (112, 112 * 16, 1e-4)
    assert (slower.train.max_steps, slower.optim.lr, slower.loss.name) == (56, 3e-5, "nll")
    assert centre.loss.params == {"alpha": 1.4} and longer.loss.params == {"alpha": 1.4}
    # every point's sweep scores the swept training prompts only (the later support= wins)
    from recall_dist.configtree import load_config
    from recall_dist.eval.config import SweepConfig

    support = Path(__file__).resolve().parents[2] / "configs" / "support_example.jsonl"
    recipe.out = support.parent.parent  # grid_sweep_overrides names OUT/data/support_train.jsonl
    overrides = recipe.grid_sweep_overrides(Prepared("/m", sweep=["support=/elsewhere.jsonl"]))
    assert overrides[-1] == f"support={recipe.out / 'data' / 'support_train.jsonl'}"
    sweep = load_config(
        SweepConfig,
        CONFIG_DIR / "sweep.yaml",
        ["support=/elsewhere.jsonl", f"support={support}", f"models=[{{name: a, path: {tmp_path}}}]"],
    )
    assert sweep.support == str(support)


def _curve(shift: float) -> list[tuple[float, float, float]]:
    """(T, precision, recall): Precision falls linearly from 0.98 at T = 0.3 to 0.02 at T = 2.0; Recall is
    0.2 + 0.5 (1 - Precision) + shift, so at every Precision the curve with the larger shift is higher."""
    points = []
    for k in range(18):
        t = 0.3 + k * 0.1
        p = 0.98 - (t - 0.3) * 0.96 / 1.7
        points.append((t, p, 0.2 + 0.5 * (1 - p) + shift))
    return points


def test_verdicts_against_worked_curves():
    nll, higher, lower = _curve(0.0), _curve(0.05), _curve(-0.05)
    data = {"nll": {0: nll}, "cdiv-1.4": {0: higher}, "cdiv-2.0": {0: lower}, "cdiv-1.1": {0: _curve(0.004)}}
    points = [Setting("nll", "nll"), Setting("cdiv-1.4", "cdiv"), Setting("cdiv-2.0", "cdiv")]
    points.append(Setting("cdiv-1.1", "cdiv"))
    stats = {s["point"].name: s for s in point_statistics(points, data, BANDS, TIE)}
    # Recall at Precision >= p is the best over the curve's temperatures, so the margin is the shift exactly
    for band in BANDS[:-1]:
        assert stats["cdiv-1.4"]["bands"][band][0]["margin"] == pytest.approx(0.05, abs=1e-12)
        assert stats["cdiv-2.0"]["bands"][band][0]["margin"] == pytest.approx(-0.05, abs=1e-12)
    assert (stats["cdiv-1.4"]["verdict"], stats["cdiv-2.0"]["verdict"], stats["cdiv-1.1"]["verdict"]) == (
        "gains",
        "loses",
        "ties",
    )
    # a curve that is higher where both are precise but never reaches NLL's top Precision: mixed
    capped = [x for x in _curve(0.05) if x[1] < 0.9]
    data["cdiv-1.2"] = {0: capped}
    mixed = point_statistics([Setting("nll", "nll"), Setting("cdiv-1.2", "cdiv")], data, BANDS, TIE)[0]
    assert mixed["bands"][BANDS[-2]][0]["verdict"] == "NLL only" and mixed["verdict"] == "mixed"
    assert verdict({b: [{"verdict": "neither"}] for b in BANDS}) == "n/a"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/iso-codes/json/iso_3166-2.json").is_file(), reason="needs iso-codes")
def test_quick_grid_end_to_end_and_resume(tmp_path):
    model, out = tiny_chat_model(tmp_path / "tiny"), tmp_path / "grid"
    cmd = [
        sys.executable,
        "-m",
        "recall_dist",
        "demo-lm",
        "--grid",
        "--quick",
        "--model",
        str(model),
        "--out",
        str(out),
    ]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the grid sweeps the training prompts only: no familiar group is scored (its own default beats demo-lm's)
    assert "familiar prompts: scoring" not in done.stdout and not (out / "data" / "familiar_scores.csv").exists()
    with open(out / "grid.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    quick = IsoRecipe.quick()
    assert {r["point"] for r in rows} == {"nll", "cdiv-1.4"}
    assert len(rows) == 2 * len(quick.temperatures)
    text = (out / "grid.md").read_text()
    assert "| cdiv-1.4: cdiv {alpha: 1.4}, lr 0.0001, 2 steps |" in text
    # a second call with --resume reuses both fine-tunes and sweeps and writes the same table
    again = subprocess.run([*cmd, "--resume"], check=False, capture_output=True, text=True, timeout=900, cwd=root)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reused") == 4, again.stdout
    assert (out / "grid.md").read_text() == text


def test_report_reads_the_runs_out_holds(tmp_path):
    """--report: every swept run in OUT (here 2 seeds of NLL and c-Div 1.4, none of the other points) makes
    the tables; margins are paired by seed and NLL's seed-to-seed range is shown beside them."""
    from recall_dist.demo.recipe_grid import report_only

    shifts = {"nll": 0.0, "nll-s1": 0.03, "cdiv-1.4": 0.05, "cdiv-1.4-s1": 0.05}  # c-Div: +0.05 and +0.02 by seed
    for name, shift in shifts.items():
        (tmp_path / "sweeps" / name).mkdir(parents=True)
        lines = ["model,temperature,precision,recall"] + [f"{name},{t},{p},{r}" for t, p, r in _curve(shift)]
        (tmp_path / "sweeps" / name / "sweep.csv").write_text("\n".join(lines) + "\n")
    base = IsoRecipe.full()
    recipe = LmGridRecipe(
        finetune_steps=base.finetune_steps, global_batch=base.global_batch, temperatures=base.temperatures, out=tmp_path
    )
    recipe.seeds = 3
    text = report_only(recipe).read_text()
    assert recipe.points == [POINTS[0], POINTS[1]] and recipe.seeds == 2
    row = next(line for line in text.splitlines() if line.startswith("| cdiv-1.4: "))
    assert "2 seeds" in row and "+0.035 [+0.020, +0.050] higher" in row and "**gains**" in row
    assert "| (nll's seed-to-seed range" in text and "| 0.030 |" in text
    with pytest.raises(DemoError, match="no swept grid point"):
        report_only(LmGridRecipe(finetune_steps=56, global_batch=16, temperatures=[1.0], out=tmp_path / "empty"))
