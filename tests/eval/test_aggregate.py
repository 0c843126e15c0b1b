"""recall_dist/eval/aggregate.py on shard files written here by hand (with the real writers of
recall_dist/eval/shards.py, no model runs): the known-support table is the P(prompt)-weighted mean of
the per-prompt numbers (standard errors sqrt(sum w^2 var) / sum w), computed here in plain Python, and
the same whether the records sit in 1 shard or 4; the text table equals ``prdc.compute_prdc`` on each
(model, T) group's embeddings, for 1 or 3 k-NN parts; ``sweep.csv`` and ``sweep.json`` hold those rows;
a missing shard, or one keyed by another config or other model contents, is a clear error.

The same code under real sweeps (shards computed by models): tests/eval/test_sweep.py, test_shards.py."""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from recall_dist.configtree import from_dict
from recall_dist.eval import SweepConfig, aggregate
from recall_dist.eval.aggregate import KNOWN_SUPPORT_COLUMNS, TEXT_COLUMNS, text_part_path
from recall_dist.eval.shards import encode_array, shard_items, shard_key, shard_path, work_items, write_json_atomic

TEMPERATURES = [0.5, 1.0, 2.0]
LAMBDAS = [0.25, 1.0, 4.0]


def _models(tmp_path) -> list[dict]:
    models = []
    for name in ("nll", "cdiv"):  # a model's content is only fingerprinted here: any file will do
        directory = tmp_path / "models" / name
        directory.mkdir(parents=True)
        (directory / "weights.bin").write_bytes(name.encode() * 100)
        models.append({"name": name, "path": str(directory)})
    return models


def _known_support_config(tmp_path, **extra) -> SweepConfig:
    data = {
        "models": _models(tmp_path),
        "task": "product_conditional",
        "task_params": {"max_factor": 3},  # prompts 1*, 2*, 3*: 6 work items
        "temperatures": TEMPERATURES,
        "num_samples": 20,
        "lambdas": LAMBDAS,
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    return from_dict(SweepConfig, data)


def _known_support_records(cfg: SweepConfig, seed: int = 0) -> list[dict]:
    """One record per work item as ``sweep.compute_shard`` writes it, with made-up numbers and weights."""
    rng = random.Random(seed)
    records = []
    for item in work_items(cfg):
        per_t = []
        for _ in cfg.temperatures:
            prec, rec = rng.random(), rng.random()
            per_t.append(
                {
                    "precision": prec,
                    "recall": rec,
                    "alpha": [rng.random() for _ in LAMBDAS],
                    "precision_sampled": rng.random(),
                    "recall_sampled": rng.random(),
                    "precision_sampled_var": rng.random() / 100,
                    "recall_sampled_var": rng.random() / 100,
                    "recall_at_num_samples": rng.random(),
                }
            )
        weight = rng.uniform(0.1, 2.0)  # unequal: a plain mean over prompts would be wrong
        records.append(
            {"item": item.index, "model": item.model, "prompt": item.prompt, "weight": weight, "temperatures": per_t}
        )
    return records


def _write_shards(cfg: SweepConfig, records: list[dict], num_shards: int) -> None:
    for s in range(num_shards):
        mine = shard_items(records, s, num_shards)  # the same contiguous blocks as the work items
        data = {"key": shard_key(cfg, s, num_shards), "shard_index": s, "num_shards": num_shards, "records": mine}
        write_json_atomic(shard_path(cfg, s, num_shards), data)


SPREAD = [f"{name}_{stat}" for name in ("precision", "recall") for stat in ("std", "min", "max")]


def _spread(mine: list[dict], k: int, total: float) -> dict:
    """Over the prompts at temperature index k: the P(prompt)-weighted std about the weighted mean, min, max."""
    out = {}
    for name in ("precision", "recall"):
        values = [r["temperatures"][k][name] for r in mine]
        mean = sum(r["weight"] * v for r, v in zip(mine, values, strict=True)) / total
        var = sum(r["weight"] * (v - mean) ** 2 for r, v in zip(mine, values, strict=True)) / total
        out.update({f"{name}_std": math.sqrt(var), f"{name}_min": min(values), f"{name}_max": max(values)})
    return out


def _reference_rows(cfg: SweepConfig, records: list[dict]) -> tuple[list[dict], dict]:
    """The table in one piece, by the formulas: sum w x / sum w, sqrt(sum w^2 var) / sum w; alpha / lambda."""
    rows, curves = [], {}
    for model in ("nll", "cdiv"):
        mine = [r for r in records if r["model"] == model]
        total = sum(r["weight"] for r in mine)
        for k, t in enumerate(TEMPERATURES):

            def mean(key, mine=mine, k=k, total=total):
                return sum(r["weight"] * r["temperatures"][k][key] for r in mine) / total

            def se(key, mine=mine, k=k, total=total):
                return math.sqrt(sum(r["weight"] ** 2 * r["temperatures"][k][key] for r in mine)) / total

            rows.append(
                {
                    "model": model,
                    "temperature": t,
                    "precision": mean("precision"),
                    "recall": mean("recall"),
                    "recall_at_n": 20,
                    "precision_sampled": mean("precision_sampled"),
                    "precision_sampled_se": se("precision_sampled_var"),
                    "recall_sampled": mean("recall_sampled"),
                    "recall_sampled_se": se("recall_sampled_var"),
                    "recall_at_num_samples": mean("recall_at_num_samples"),
                    "num_samples": 20,
                    "num_prompts": 3,
                    **_spread(mine, k, total),
                }
            )
            alpha = [sum(r["weight"] * r["temperatures"][k]["alpha"][j] for r in mine) / total for j in range(3)]
            curves[(model, t)] = {"alpha": alpha, "beta": [a / lam for a, lam in zip(alpha, LAMBDAS, strict=True)]}
    return rows, curves


def _approx_rows(rows: list[dict]) -> list:
    return [{k: pytest.approx(v, rel=1e-12) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def test_known_support_table_is_the_weighted_mean_over_prompts_in_any_number_of_shards(tmp_path):
    cfg = _known_support_config(tmp_path, num_shards=4)
    records = _known_support_records(cfg)
    random.Random(1).shuffle(records)  # in whatever order the shards list them: aggregation sorts by item
    records.sort(key=lambda r: r["item"])
    _write_shards(cfg, records, 4)  # items per shard: 1, 2, 1, 2 (a model's prompts split across shards)
    result = aggregate(cfg)  # num_shards from the config
    expected_rows, expected_curves = _reference_rows(cfg, records)
    assert result["rows"] == _approx_rows(expected_rows)
    assert set(result["rows"][0]) == set(KNOWN_SUPPORT_COLUMNS)  # every column (their order: the CSV's)
    assert result["lambdas"] == LAMBDAS
    curves = {(c["model"], c["temperature"]): {"alpha": c["alpha"], "beta": c["beta"]} for c in result["pr_curves"]}
    assert curves.keys() == expected_curves.keys()
    for key, curve in expected_curves.items():
        assert curves[key] == {name: pytest.approx(v, rel=1e-12) for name, v in curve.items()}, key

    _write_shards(cfg, records, 1)  # the same records in one shard: bit-identical numbers
    assert aggregate(cfg, 1)["rows"] == result["rows"]


def test_the_files_written_hold_the_table(tmp_path):
    cfg = _known_support_config(tmp_path, num_shards=2)
    records = _known_support_records(cfg, seed=2)
    _write_shards(cfg, records, 2)
    result = aggregate(cfg)
    out = tmp_path / "out"
    with open(out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == KNOWN_SUPPORT_COLUMNS
        table = list(reader)
    assert len(table) == len(result["rows"]) == 2 * len(TEMPERATURES)
    for line, row in zip(table, result["rows"], strict=True):
        assert line["model"] == row["model"]
        assert {k: float(v) for k, v in line.items() if k != "model"} == {k: v for k, v in row.items() if k != "model"}
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert result["metric"] == "known_support" and result["references"] is None
    for model in ("nll", "cdiv"):
        mine = [r for r in result["rows"] if r["model"] == model]
        best = max(mine, key=lambda r: r["recall"])
        assert result["summary"][model]["max_recall"] == best["recall"]
        assert result["summary"][model]["temperature_at_max_recall"] == best["temperature"]
    with Image.open(out / "pr_curve.png") as image:
        assert image.format == "PNG"

    exact_only = _known_support_config(tmp_path / "exact", num_samples=0, recall_at_n=5)
    kept = ("precision", "recall", "alpha")
    for r in (records := _known_support_records(exact_only)):
        r["temperatures"] = [{k: v for k, v in t.items() if k in kept} for t in r["temperatures"]]
    _write_shards(exact_only, records, 1)
    aggregate(exact_only, 1)
    with open(tmp_path / "exact" / "out" / "sweep.csv", newline="") as f:  # no sampled columns
        assert csv.DictReader(f).fieldnames == [
            "model", "temperature", "precision", "recall", "recall_at_n", "num_samples", "num_prompts", *SPREAD
        ]  # fmt: skip


def test_missing_or_stale_shards_are_a_clear_error(tmp_path):
    cfg = _known_support_config(tmp_path)
    records = _known_support_records(cfg)
    _write_shards(cfg, records, 4)
    with pytest.raises(ValueError, match="aggregate needs num_shards"):
        aggregate(cfg)  # neither an argument nor cfg.num_shards
    with pytest.raises(FileNotFoundError, match=r"3 of 3 shards missing"):
        aggregate(cfg, 3)  # computed for 4 shards: none of 3 exists
    shard_path(cfg, 2, 4).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards missing .* \[2\]"):
        aggregate(cfg, 4)
    _write_shards(cfg, records, 4)
    assert aggregate(cfg, 4)["rows"]

    # Shard 1 computed under another config (a different temperature grid): not this sweep's.
    other = _known_support_config(tmp_path / "other", temperatures=[0.5, 1.0, 3.0])
    stale = json.loads(shard_path(cfg, 1, 4).read_text())
    stale["key"] = shard_key(other, 1, 4)
    write_json_atomic(shard_path(cfg, 1, 4), stale)
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards missing .* \[1\]"):
        aggregate(cfg, 4)

    # A model retrained in place: every shard holding its items is stale (1 and 2 hold cdiv's 3 prompts).
    _write_shards(cfg, records, 4)
    (tmp_path / "models" / "cdiv" / "weights.bin").write_bytes(b"retrained")
    with pytest.raises(FileNotFoundError, match=r"2 of 4 shards missing .* \[2, 3\]"):
        aggregate(cfg, 4)


def test_shards_that_do_not_hold_every_work_item_once_are_refused(tmp_path):
    cfg = _known_support_config(tmp_path)
    records = _known_support_records(cfg)
    data = {"key": shard_key(cfg, 0, 1), "shard_index": 0, "num_shards": 1, "records": records[:-1] + records[:1]}
    write_json_atomic(shard_path(cfg, 0, 1), data)
    with pytest.raises(ValueError, match="shards hold 6 work items, expected 6 distinct ones"):
        aggregate(cfg, 1)


# ------------------------------------------------------------------------------------------- text

NUM_TEXTS, K, DIM = 14, 3, 5


def _text_config(tmp_path) -> SweepConfig:
    return from_dict(
        SweepConfig,
        {
            "models": _models(tmp_path),
            "task": "product_conditional",
            "task_params": {"max_factor": 3},
            "metric": "text",
            "temperatures": TEMPERATURES,
            "num_samples": 0,
            "recall_at_n": 1,
            "output_dir": str(tmp_path / "out"),
            "text": {"num_texts": NUM_TEXTS, "chunk_size": 4, "k": K, "explained_variance": 1.0},
        },
    )


def _text_records(cfg: SweepConfig, refs: np.ndarray, gens: dict) -> list[dict]:
    """One record per (model, chunk of reference rows) as ``sweep.compute_shard`` writes it."""
    records = []
    for item in work_items(cfg):
        rows = slice(item.row_start, item.row_stop)
        per_t = [
            {"texts": ["?"] * (item.row_stop - item.row_start), "embeddings": encode_array(gens[item.model, k][rows])}
            for k in range(len(cfg.temperatures))
        ]
        record = {"item": item.index, "model": item.model, "row_start": item.row_start, "row_stop": item.row_stop}
        record["temperatures"] = per_t
        if item.model == cfg.models[0].name:  # sentence-transformers: the references embedded once
            record["reference_embeddings"] = encode_array(refs[rows])
        records.append(record)
    return records


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("num_parts", [1, 3])
def test_text_table_equals_prdc_on_each_group(tmp_path, num_parts):
    from prdc import compute_prdc

    cfg = _text_config(tmp_path)
    rng = np.random.default_rng(0)
    refs = rng.normal(size=(NUM_TEXTS, DIM)).astype(np.float32)
    # Generations from faithful (small noise) to collapsed (shrunk towards one point) to shifted off-support.
    spread = {("nll", 0): (1.0, 0.1, 0), ("nll", 1): (0.2, 0.05, 0), ("nll", 2): (1.0, 0.5, 3.0)}
    spread |= {("cdiv", 0): (0.5, 0.3, 0), ("cdiv", 1): (1.0, 0.5, 0.7), ("cdiv", 2): (0.05, 0.02, 0)}
    gens = {
        key: refs[0] + scale * (refs - refs[0]) + rng.normal(scale=noise, size=refs.shape) + shift * np.eye(DIM)[0]
        for key, (scale, noise, shift) in spread.items()
    }
    gens = {key: x.astype(np.float32) for key, x in gens.items()}
    records = _text_records(cfg, refs, gens)
    assert len(records) == 2 * 4  # chunks of 4 reference rows: 4 + 4 + 4 + 2
    _write_shards(cfg, records, 3)
    result = aggregate(cfg, 3, num_parts)
    assert [p.name for p in sorted((tmp_path / "out" / "shards").glob("text-part-*"))] == [
        text_part_path(cfg, p, num_parts).name for p in range(num_parts)
    ]
    expected = []
    for m in cfg.models:
        for k, t in enumerate(TEMPERATURES):
            # explained_variance 1: L2-normalised, all PCA components kept, which preserves the distances
            scores = compute_prdc(_unit_rows(refs), _unit_rows(gens[m.name, k]), nearest_k=K)
            expected.append({"model": m.name, "temperature": t, **scores, "num_texts": NUM_TEXTS})
    assert result["rows"] == [{k: pytest.approx(v, abs=1e-12) for k, v in r.items()} for r in expected]
    scores = {tuple(r[name] for name in ("precision", "recall", "density", "coverage")) for r in result["rows"]}
    assert len(scores) == 6  # every group its own numbers: a mix-up of groups would show
    with open(tmp_path / "out" / "sweep.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames == TEXT_COLUMNS


def test_model_labels_are_columns_and_change_no_number(tmp_path):
    """A model entry's ``seed`` / ``family`` (``ModelSpec``) reach sweep.csv and sweep.json as columns, next
    to the model; the numbers, and the shard keys (shards computed without labels are reused), stay as
    they were.  Without labels there are no such columns (tested above)."""
    cfg = _known_support_config(tmp_path, num_shards=2)
    records = _known_support_records(cfg, seed=3)
    _write_shards(cfg, records, 2)
    plain = aggregate(cfg)
    models = [{"name": m.name, "path": m.path, "family": "loss", "seed": k} for k, m in enumerate(cfg.models)]
    del models[1]["family"]  # a seed without a family: the model is its own family
    labelled_cfg = _known_support_config(tmp_path / "labelled", num_shards=2, models=models, output_dir=cfg.output_dir)
    assert shard_key(labelled_cfg, 0, 2)["config"] == shard_key(cfg, 0, 2)["config"]
    labelled = aggregate(labelled_cfg)
    with open(tmp_path / "out" / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["model", "family", "seed", *KNOWN_SUPPORT_COLUMNS[1:]]
        table = list(reader)
    assert [(r["model"], r["family"], r["seed"]) for r in table] == [("nll", "loss", "0")] * 3 + [
        ("cdiv", "cdiv", "1")
    ] * 3
    assert [{k: v for k, v in r.items() if k not in ("family", "seed")} for r in labelled["rows"]] == plain["rows"]
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [(r["family"], r["seed"]) for r in saved["rows"]] == [("loss", 0)] * 3 + [("cdiv", 1)] * 3
