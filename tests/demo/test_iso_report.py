"""``demo/iso_report.py`` against worked values: the band margins of hand-made curves (checked against
``np.interp`` on the monotone curves, and by hand where a curve never reaches a band), margins paired by
seed, and summary.md from a hand-made ``sweep.csv`` / ``sweep_prompts.csv`` whose per-prompt numbers
average to known curves."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from recall_dist.demo.iso_prompts import prompt_messages
from recall_dist.demo.iso_report import (
    BANDS,
    LEVELS_PER_BAND,
    LOW_BANDS,
    TIE,
    band_margin,
    band_statistics,
    read_groups,
    seed_range,
    summary_markdown,
)
from recall_dist.eval.support_file import prompt_key, write_support_file

# (T, precision, recall), Precision falling and Recall rising with T: the upper envelope is np.interp.
NLL = [(0.3, 0.995, 0.4), (0.5, 0.99, 0.5), (1.0, 0.9, 0.7), (1.5, 0.8, 0.8)]
CDIV = [(0.3, 0.95, 0.6), (0.5, 0.9, 0.7), (1.0, 0.85, 0.8), (1.5, 0.7, 0.9)]  # same T grid as NLL


def envelope(points, p: float) -> float:
    """Recall at Precision p on a curve monotone in T (NaN above its highest Precision, its max Recall below
    its lowest): plain linear interpolation, independent of ``verdicts.recall_at``."""
    prec = np.array([q for _, q, _ in points])[::-1]
    rec = np.array([r for _, _, r in points])[::-1]
    if p > prec.max():
        return math.nan
    return float(np.interp(p, prec, rec))


def levels(band) -> np.ndarray:
    lo, hi = band
    return lo + (hi - lo) * (np.arange(LEVELS_PER_BAND) + 0.5) / LEVELS_PER_BAND


@pytest.mark.parametrize("band", BANDS[:3])
def test_band_margin_is_the_mean_gap_at_equal_precision(band):
    expected = np.mean([envelope(CDIV, p) - envelope(NLL, p) for p in levels(band)])
    got = band_margin(CDIV, NLL, band)
    assert got["margin"] == pytest.approx(expected, abs=1e-12)
    assert got["both"] == LEVELS_PER_BAND
    assert got["verdict"] == ("higher" if expected > TIE else "lower" if expected < -TIE else "tie")


def test_band_margin_worked_values():
    # [0.5, 0.8): CDIV's Recall is 0.9 below P = 0.7 and 0.8 + (0.85 - p) / 1.5 above; NLL's is 0.8.
    lo = band_margin(CDIV, NLL, BANDS[0])
    gaps = [(0.9 if p <= 0.7 else 0.8 + (0.85 - p) / 1.5) - 0.8 for p in levels(BANDS[0])]
    assert lo["margin"] == pytest.approx(np.mean(gaps)) and lo["verdict"] == "higher"
    # [0.95, 0.99): CDIV's best Precision is 0.95, so every level is NLL's alone.
    assert band_margin(CDIV, NLL, BANDS[3]) | {"margin": 0} == {
        "margin": 0,
        "both": 0,
        "only_loss": 0,
        "only_ref": LEVELS_PER_BAND,
        "verdict": "NLL only",
    }
    # >= 0.99: NLL reaches 0.995, i.e. the 10 levels 0.99025 ... 0.99475; nobody reaches the rest.
    top = band_margin(CDIV, NLL, BANDS[4])
    assert (top["only_ref"], top["both"], top["verdict"]) == (10, 0, "NLL only")
    assert band_margin(NLL, CDIV, BANDS[4])["verdict"] == "loss only"
    assert band_margin(CDIV, CDIV, BANDS[1]) == {
        "margin": 0.0,
        "both": 20,
        "only_loss": 0,
        "only_ref": 0,
        "verdict": "tie",
    }


def shifted(points, dr: float):
    return [(t, p, r + dr) for t, p, r in points]


def test_margins_are_paired_by_seed():
    curves = {"nll": {0: NLL, 1: shifted(NLL, -0.05)}, "cdiv-1.4": {0: CDIV, 1: shifted(CDIV, -0.03)}}
    stats = band_statistics(curves)
    assert list(stats) == ["cdiv-1.4"]
    for band in BANDS[:3]:
        s0, s1 = stats["cdiv-1.4"][band]
        assert s1["margin"] - s0["margin"] == pytest.approx(0.02)  # each seed against its own NLL
    assert seed_range(curves["nll"], BANDS[1]) == pytest.approx(0.05)  # NLL's seeds: 0.05 apart everywhere
    assert math.isnan(seed_range({0: NLL}, BANDS[1])) and math.isnan(seed_range(curves["cdiv-1.4"], BANDS[4]))
    with pytest.raises(ValueError, match=r"lacks seed\(s\) \[1\]"):
        band_statistics({"nll": {0: NLL, 1: NLL}, "cdiv-1.4": {0: CDIV}})
    with pytest.raises(ValueError, match="no 'nll' model"):
        band_statistics({"cdiv-1.4": {0: CDIV}})


def write_sweep(out, groups: dict[str, list[str]], curves: dict[str, list], delta: float = 0.004, labels=None) -> dict:
    """A sweep's two tables for models ``curves`` (``labels``: model -> (family, seed); default its own
    family, seed 0): each group's prompts at each T sit at the
    curve's value +- ``delta`` (prompt 0 +, prompt 1 -), so their mean is the curve; and the support files."""
    files, prompt_rows, sweep_rows = {}, [], []
    for group, texts in groups.items():
        rows = [{"messages": prompt_messages(t), "completion": f"A{k}", "p": 0.5} for t in texts for k in (1, 2)]
        files[group] = write_support_file(rows, out / f"{group}.jsonl")
    keys = {g: [prompt_key(prompt_messages(t)) for t in texts] for g, texts in groups.items()}
    for model, points in curves.items():
        family, seed = (labels or {}).get(model, (model, 0))
        for t, p, r in points:
            sweep_rows.append(
                {
                    "model": model,
                    "family": family,
                    "seed": seed,
                    "temperature": t,
                    "precision": p,
                    "recall": r,
                    "recall_at_n": 100,
                }
            )
            for group_keys in keys.values():
                for i, key in enumerate(group_keys):
                    d = delta if i == 0 else -delta
                    prompt_rows.append(
                        {"model": model, "temperature": t, "prompt": key, "precision": p + d, "recall": r + d}
                    )
    for name, rows in (("sweep.csv", sweep_rows), ("sweep_prompts.csv", prompt_rows)):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return files


def test_summary_from_hand_made_tables(tmp_path):
    groups = {"training": ["Name a red thing.", "Name a blue thing."], "held-out": ["Name a cat.", "Name a dog."]}
    files = write_sweep(tmp_path, groups, {"nll": NLL, "cdiv-1.4": CDIV})
    assert read_groups(files)[prompt_key(prompt_messages("Name a cat."))] == "held-out"
    text = summary_markdown(tmp_path, files)
    margin = band_margin(CDIV, NLL, BANDS[0])["margin"]
    row = f"| cdiv-1.4 | {margin:+.3f} higher | "
    assert text.count(row) == 2  # the same curves in both groups
    assert "NLL only |" in text
    assert "## Recall over NLL at the same Precision: held-out prompts (2)" in text
    # T = 1 of NLL: mean 0.9 / 0.7 over the two prompts, std 0.004 each
    assert "| 1 | 0.900 / 0.700 (±0.004, ±0.004) | 0.850 / 0.800 (±0.004, ±0.004) |" in text
    assert "- training prompts: at T = 1 NLL has Precision 0.900, Recall 0.700; best Recall above" in text
    assert "- cdiv-1.4: on training prompts higher in every seed at P ∈ [0.5, 0.8)" in text
    assert "whole curve: mixed 1/1" in text  # higher at NLL's lower-Precision points, 0 where it is never as precise
    assert (tmp_path / "pr_curve_training.png").is_file() and (tmp_path / "pr_curve_heldout.png").is_file()


def test_a_swept_prompt_of_no_group_is_an_error(tmp_path):
    files = write_sweep(tmp_path, {"training": ["Name a red thing."], "held-out": ["Name a cat."]}, {"nll": NLL})
    files.pop("held-out")
    with pytest.raises(ValueError, match="is in no group's support file"):
        summary_markdown(tmp_path, files)


def test_summary_with_seeds_pairs_the_margins_and_shows_nll_spread(tmp_path):
    groups = {"training": ["Name a red thing."], "held-out": ["Name a cat."]}
    curves = {"nll-s0": NLL, "nll-s1": shifted(NLL, -0.05), "c-s0": CDIV, "c-s1": shifted(CDIV, -0.03)}
    labels = {"nll-s0": ("nll", 0), "nll-s1": ("nll", 1), "c-s0": ("cdiv-1.4", 0), "c-s1": ("cdiv-1.4", 1)}
    text = summary_markdown(tmp_path, write_sweep(tmp_path, groups, curves, delta=0.0, labels=labels))
    m0 = band_margin(CDIV, NLL, BANDS[1])["margin"]
    m1 = band_margin(shifted(CDIV, -0.03), shifted(NLL, -0.05), BANDS[1])["margin"]
    assert m1 == pytest.approx(m0 + 0.02)
    mean = (m0 + m1) / 2
    assert f"| {mean:+.3f} [{m0:+.3f}, {m1:+.3f}] higher 2/2 |" in text
    assert "| (NLL's seed-to-seed range) | 0.050 | 0.050 | 0.050 | 0.050 | 0.050 |" in text


def test_a_group_nll_never_makes_precise_is_compared_in_the_low_bands(tmp_path):
    """The familiar prompts' case: NLL's Precision stays under BANDS[0] at every T, so the group's table has
    LOW_BANDS' columns, with margins equal to the independent envelope's; a group NLL does make precise keeps
    BANDS."""
    nll = [(0.3, 0.15, 0.05), (0.5, 0.1, 0.07), (1.0, 0.04, 0.09), (1.5, 0.01, 0.1)]
    cdiv = [(t, p, r + 0.02) for t, p, r in nll]
    files = write_sweep(tmp_path, {"familiar": ["Name a cat.", "Name a dog."]}, {"nll": nll, "cdiv-1.4": cdiv}, 0.0)
    text = summary_markdown(tmp_path, files)
    header = "| loss | " + " | ".join(f"P ∈ [{lo:g}, {hi:g})" for lo, hi in LOW_BANDS) + " |"
    assert header in text and "NLL never reaches Precision 0.5 on these prompts" in text
    for band in LOW_BANDS[:3]:
        expected = np.nanmean([envelope(cdiv, p) - envelope(nll, p) for p in levels(band)])  # levels both reach
        assert expected == pytest.approx(0.02)
        assert band_statistics({"nll": {0: nll}, "cdiv-1.4": {0: cdiv}})["cdiv-1.4"][band][0]["margin"] == (
            pytest.approx(expected)
        )
    assert "| cdiv-1.4 | +0.020 higher | +0.020 higher | +0.020 higher | neither |" in text
    assert list(band_statistics({"nll": {0: NLL}, "cdiv-1.4": {0: CDIV}})["cdiv-1.4"]) == list(BANDS)


def test_a_loss_trained_longer_is_read_against_nll_trained_as_long(tmp_path):
    """``references``: cdiv-long's margins are against nll-long's curve of the same seed (the independent
    envelope), not against NLL's; nll-long itself is read against NLL; the bands stay NLL's."""
    nll_long = shifted(NLL, 0.05)
    cdiv_long = shifted(NLL, 0.08)  # +0.03 over nll-long everywhere, +0.08 over NLL
    curves = {"nll": {0: NLL}, "nll-long": {0: nll_long}, "cdiv-long": {0: cdiv_long}}
    references = {"nll-long": "nll", "cdiv-long": "nll-long"}
    stats = band_statistics(curves, references)
    for band in BANDS[:3]:
        expected = np.mean([envelope(cdiv_long, p) - envelope(nll_long, p) for p in levels(band)])
        assert expected == pytest.approx(0.03)
        assert stats["cdiv-long"][band][0]["margin"] == pytest.approx(expected)
        assert stats["nll-long"][band][0]["margin"] == pytest.approx(0.05)
    assert band_statistics(curves)["cdiv-long"][BANDS[0]][0]["margin"] == pytest.approx(0.08)  # no references
    with pytest.raises(ValueError, match="read against 'nll-long', which the sweep lacks"):
        band_statistics({"nll": {0: NLL}, "cdiv-long": {0: cdiv_long}}, references)
    groups = {"training": ["Name a red thing."], "held-out": ["Name a cat."]}
    files = write_sweep(tmp_path, groups, {"nll": NLL, "nll-long": nll_long, "cdiv-long": cdiv_long}, 0.0)
    text = summary_markdown(tmp_path, files, references=references)
    assert text.count("| cdiv-long (vs nll-long) | +0.030 higher | +0.030 higher | +0.030 higher |") == 2
    assert text.count("| nll-long | +0.050 higher | +0.050 higher | +0.050 higher |") == 2
    assert "- cdiv-long (vs nll-long): on training prompts higher in every seed at" in text
