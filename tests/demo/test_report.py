"""recall_dist/demo/report.py on hand-made curves whose verdicts are known by construction: the summary
table and verdict, and the per-seed statistics (each seed paired with its own NLL) and their mean and
range.  The summary of a real ``demo --quick`` run, checked against its sweep.csv: tests/e2e/test_demo.py."""

from __future__ import annotations

import pytest

from recall_dist.demo import report as demo_report
from recall_dist.demo.verdicts import seed_statistics


def test_summary_markdown_names_every_model_and_needs_nll():
    curves = {"nll": [(0.5, 0.99, 0.5), (1.0, 0.95, 0.6)], "cdiv-1.4": [(0.5, 0.995, 0.6), (1.0, 0.96, 0.7)]}
    text = demo_report.summary_markdown({model: {0: points} for model, points in curves.items()})
    assert "| cdiv-1.4 |" in text and "**dominates**" in text and "over seeds" not in text
    with pytest.raises(ValueError, match="no 'nll' model"):
        demo_report.summary_markdown({"cdiv-1.4": {0: curves["cdiv-1.4"]}})


# Three seeds of hand-made curves (family -> seed -> points): cdiv is above NLL at every level in every
# seed; "flat" ties NLL.
SEEDED: dict[str, dict[int, list]] = {"nll": {}, "cdiv": {}, "flat": {}}
for _s, _shift in enumerate((0.0, 0.01, -0.01)):
    SEEDED["nll"][_s] = [(0.5, 0.999, 0.50 + _shift), (1.0, 0.99, 0.60 + _shift), (2.0, 0.90, 0.55 + _shift)]
    SEEDED["cdiv"][_s] = [(0.5, 0.999, 0.56 + _shift), (1.0, 0.992, 0.66 + 2 * _shift), (2.0, 0.93, 0.62)]
    SEEDED["flat"][_s] = list(SEEDED["nll"][_s])


def test_seed_statistics_pair_each_seed_with_its_nll():
    stats = seed_statistics(SEEDED, "nll", levels=(0.99, 0.999))
    assert set(stats) == {"nll", "cdiv", "flat"} and set(stats["cdiv"]) == {0, 1, 2}
    for seed, shift in enumerate((0.0, 0.01, -0.01)):
        cdiv = stats["cdiv"][seed]
        # NLL reaches 0.999 only at T = 0.5 and 0.99 at T <= 1 (best 0.60 + shift); cdiv at 0.99: T <= 1.
        assert cdiv["recall_at"][0.99] == pytest.approx(0.66 + 2 * shift)
        assert cdiv["margin"][0.99] == pytest.approx(0.06 + shift)
        assert cdiv["margin"][0.999] == pytest.approx(0.06)
        assert cdiv["verdict"] == "dominates" and stats["flat"][seed]["verdict"] == "does not dominate"
        assert stats["nll"][seed]["margin"][0.99] == 0.0


def test_several_seeds_report_mean_and_range():
    text = demo_report.summary_markdown(SEEDED, levels=(0.99, 0.999))
    assert text.startswith("# recall-dist demo: NLL + temperature vs recall-oriented losses, over seeds\n")
    assert "| cdiv | 0.660 [0.640, 0.680] | 0.560 [0.550, 0.570] |" in text
    assert "| cdiv | +0.060 [+0.050, +0.070] | +0.060 [+0.060, +0.060] | 3 of 3 |" in text
    assert "- **cdiv**: above NLL by more than 0.002 in every seed at P >= 0.99, 0.999." in text
    assert "- **flat**: no level where every seed" in text
    with pytest.raises(ValueError, match="lacks seed"):
        seed_statistics({**SEEDED, "cdiv": {0: SEEDED["cdiv"][0], 1: SEEDED["cdiv"][1]}}, "nll", (0.99,))


def test_write_summary_groups_seeds_by_the_csv_columns_not_by_names(tmp_path):
    """A sweep.csv whose models carry ``family`` / ``seed`` columns is reported over seeds; the same curves
    named ``<loss>-s<k>`` without those columns are separate one-seed models (no name is parsed)."""
    header = "model,family,seed,temperature,precision,recall\n"
    rows = [
        f"{family}-s{seed},{family},{seed},{t},{p},{r}\n"
        for family, seeds in SEEDED.items()
        for seed, points in seeds.items()
        for t, p, r in points
    ]
    (tmp_path / "labelled.csv").write_text(header + "".join(rows))
    labelled = demo_report.write_summary(tmp_path / "labelled.csv", tmp_path / "labelled.md").read_text()
    assert labelled == demo_report.summary_markdown(SEEDED)
    unlabelled = "".join(",".join(r.split(",")[:1] + r.split(",")[3:]) for r in rows)
    (tmp_path / "names.csv").write_text("model,temperature,precision,recall\n" + unlabelled)
    with pytest.raises(ValueError, match="no 'nll' model"):  # nll-s0, nll-s1, ... are not "nll"
        demo_report.write_summary(tmp_path / "names.csv", tmp_path / "names.md")


def test_loss_settings_show_what_ran_including_the_weight_cap():
    """Every demo's "Settings:" line: the rule's parameters with its defaults, plus ``max_weight`` and
    ``nll_mix`` when set (a capped c-Div must not read like the plain one), and a setting's own steps / lr."""
    from recall_dist.demo.markdown import loss_settings
    from recall_dist.demo.pipeline import Setting

    assert loss_settings(
        [
            Setting("nll", "nll"),
            Setting("cdiv-1.4", "cdiv", {"alpha": 1.4}),
            Setting("cdiv-1.4-maxw2", "cdiv", {"alpha": 1.4, "max_weight": 2.0}),
            Setting("mixed", "cdiv", {"alpha": 2.0, "nll_mix": 0.5}),
            Setting("long", "cdiv", {"alpha": 1.1}, steps=112, lr=3e-5),
        ]
    ) == [
        "nll: `nll()`",
        "cdiv-1.4: `cdiv(alpha=1.4)`",
        "cdiv-1.4-maxw2: `cdiv(alpha=1.4, max_weight=2)`",
        "mixed: `cdiv(alpha=2.0, nll_mix=0.5)`",
        "long: `cdiv(alpha=1.1)` for 112 steps at lr 3e-05",
    ]
