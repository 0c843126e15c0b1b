"""recall_dist/demo/verdicts.py: the curve analyses (dominance, temperature effect) on hand-made curves
whose verdicts are known by construction, and the seeds of a sweep.csv read from its ``family`` / ``seed``
columns, never from a model's name."""

from __future__ import annotations

import pytest

from recall_dist.demo import verdicts


def test_verdicts_on_known_curves():
    ref = [(0.5, 0.99, 0.50), (1.0, 0.95, 0.60), (2.0, 0.70, 0.55)]
    better = [(0.5, 0.995, 0.60), (1.0, 0.96, 0.70), (2.0, 0.80, 0.65)]
    worse = [(0.5, 0.98, 0.40), (1.0, 0.90, 0.50), (2.0, 0.60, 0.45)]
    crossing = [(0.5, 0.999, 0.55), (1.0, 0.90, 0.58), (2.0, 0.60, 0.50)]
    assert verdicts.dominance(better, ref)["verdict"] == "dominates"
    assert verdicts.dominance(worse, ref)["verdict"] == "does not dominate"
    assert verdicts.dominance(crossing, ref)["verdict"] == "mixed"
    assert verdicts.dominance(ref, ref)["verdict"] == "does not dominate"  # ties are not domination
    effect = verdicts.temperature_effect(ref)
    assert not effect["rose"] and effect["argmax_t"] == 1.0 and effect["recall_t_max"] == 0.55
    assert verdicts.temperature_effect(better)["rose"] is False
    assert verdicts.temperature_effect([(1.0, 0.9, 0.5), (1.5, 0.8, 0.6)])["rose"] is True


def test_recall_at_interpolates_along_the_curve():
    points = [(0.5, 0.99, 0.1), (1.0, 0.9, 0.3), (1.5, 0.6, 0.5)]
    assert verdicts.recall_at(points, 0.75) == pytest.approx(0.4)  # halfway between P 0.9 and 0.6
    assert verdicts.recall_at(points, 0.999) != verdicts.recall_at(points, 0.999)  # NaN: never reached


def _csv(path, header: str, rows: list[str]):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def test_families_come_from_the_seed_columns(tmp_path):
    rows = [
        "nll-a,nll,0,1.0,0.9,0.5",
        "nll-b,nll,1,1.0,0.8,0.6",
        "cdiv-a,cdiv,0,1.0,0.7,0.7",
        "cdiv-b,cdiv,1,1.0,0.6,0.8",
    ]
    path = _csv(tmp_path / "sweep.csv", "model,family,seed,temperature,precision,recall", rows)
    assert verdicts.read_families(path) == {
        "nll": {0: [(1.0, 0.9, 0.5)], 1: [(1.0, 0.8, 0.6)]},
        "cdiv": {0: [(1.0, 0.7, 0.7)], 1: [(1.0, 0.6, 0.8)]},
    }
    clash = _csv(tmp_path / "clash.csv", "model,family,seed,temperature,precision,recall", [rows[0], "x,nll,0,1,1,1"])
    with pytest.raises(ValueError, match="two models of family 'nll' with seed 0"):
        verdicts.read_families(clash)


def test_a_seed_suffix_in_a_name_is_not_a_seed(tmp_path):
    """``foo-s3`` without a seed column is the model ``foo-s3`` with seed 0 (the old rule parsed ``-s<k>``
    and made it seed 3 of ``foo``); a model with empty label cells in a labelled sweep is its own family."""
    path = _csv(tmp_path / "sweep.csv", "model,temperature,precision,recall", ["foo-s3,1.0,0.9,0.5", "foo,1.0,0.8,0.6"])
    assert verdicts.read_families(path) == {"foo-s3": {0: [(1.0, 0.9, 0.5)]}, "foo": {0: [(1.0, 0.8, 0.6)]}}
    path = _csv(
        tmp_path / "mixed.csv",
        "model,family,seed,temperature,precision,recall",
        ["foo-s3,,,1.0,0.9,0.5", "bar,bar,2,1.0,0.8,0.6"],
    )
    assert verdicts.read_families(path) == {"foo-s3": {0: [(1.0, 0.9, 0.5)]}, "bar": {2: [(1.0, 0.8, 0.6)]}}


def test_spread_of_seeds():
    assert verdicts.spread([0.1, 0.2, 0.3]) == "0.200 [0.100, 0.300]"
    assert verdicts.spread([0.1, float("nan")], signed=True) == "+0.100 [+0.100, +0.100] (1 of 2)"
    assert verdicts.spread([float("nan")]) == "n/a"
