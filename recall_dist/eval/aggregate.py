"""Aggregate a sweep's shard files into the tables: ``sweep.csv``, ``sweep.json`` and ``pr_curve.png``.

Known-support metrics are P(prompt)-weighted averages over prompts: the shards hold per-item
numbers, and here every (model, T) sums ``w * value`` and ``w`` in work-item order and divides once
(variances: ``sum w^2 var / (sum w)^2``).  Text metrics are not sums: the generations of all chunks of
a (model, T) are gathered in row order and scored once against the references.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from recall_dist.eval import metrics, summary
from recall_dist.eval.config import SweepConfig

KNOWN_SUPPORT_COLUMNS = [
    "model",
    "temperature",
    "precision",
    "recall",
    "recall_at_n",
    "precision_sampled",
    "precision_sampled_se",
    "recall_sampled",
    "recall_sampled_se",
    "recall_at_num_samples",
    "num_samples",
    "num_prompts",
]
TEXT_COLUMNS = ["model", "temperature", "precision", "recall", "density", "coverage", "num_texts"]


def _load_records(cfg: SweepConfig, num_shards: int) -> list[dict]:
    from recall_dist.eval.sweep import read_shard, shard_path, work_items

    records, missing = [], []
    for s in range(num_shards):
        data = read_shard(shard_path(cfg, s, num_shards), cfg)
        if data is None:
            missing.append(s)
        else:
            records += data["records"]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {num_shards} shards missing or computed with another "
            f"config under {Path(cfg.output_dir) / 'shards'}: {missing[:10]}"
        )
    records.sort(key=lambda r: r["item"])
    expected = len(work_items(cfg))
    if [r["item"] for r in records] != list(range(expected)):
        raise ValueError(f"shards hold {len(records)} work items, expected {expected} distinct ones")
    return records


def _known_support_rows(cfg: SweepConfig, records: list[dict], lambdas: np.ndarray) -> tuple[list, dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["temperature"])].append(r)
    rows, curves = [], {}
    for (model, t), recs in groups.items():
        w = np.array([r["weight"] for r in recs])
        total = w.sum()

        def mean(key, w=w, recs=recs, total=total):
            return float(sum(wi * r[key] for wi, r in zip(w, recs, strict=True)) / total)

        def se(key, w=w, recs=recs, total=total):
            return float(np.sqrt(sum(wi * wi * r[key] for wi, r in zip(w, recs, strict=True))) / total)

        row = {
            "model": model,
            "temperature": t,
            "precision": mean("precision"),
            "recall": mean("recall"),
            "recall_at_n": cfg.recall_at_n,
            "num_samples": cfg.num_samples,
            "num_prompts": len(recs),
        }
        if cfg.num_samples > 0:
            row.update(
                precision_sampled=mean("precision_sampled"),
                precision_sampled_se=se("precision_sampled_var"),
                recall_sampled=mean("recall_sampled"),
                recall_sampled_se=se("recall_sampled_var"),
                recall_at_num_samples=mean("recall_at_num_samples"),
            )
        alpha = np.sum([wi * np.asarray(r["alpha"]) for wi, r in zip(w, recs, strict=False)], axis=0) / total
        curves[(model, t)] = {"alpha": alpha.tolist(), "beta": (alpha / lambdas).tolist()}
        rows.append(row)
    return rows, curves


def _text_rows(cfg: SweepConfig, records: list[dict]) -> list[dict]:
    from recall_dist.eval import text
    from recall_dist.eval.sweep import load_model, reference_rows

    references = [r["completion"] for r in reference_rows(cfg)]
    generations: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        generations[(r["model"], r["temperature"])] += r["texts"]
    specs = {m.name: m for m in cfg.models}
    encoder, encoded_for, rows = None, None, []
    for (model, t), texts in generations.items():
        # One encoder for every temperature, so the embedding space is fixed across the grid.
        if cfg.text.encoder == "sentence-transformers" and encoder is None:
            encoder = text.SentenceTransformerEncoder(cfg.text.encoder_path)
            ref_emb = encoder.encode(references)
        elif cfg.text.encoder == "lm" and encoded_for != model:  # the evaluated LM's own hidden states
            encoder = text.HiddenStateEncoder(*load_model(specs[model], Path(cfg.output_dir) / "exported"))
            encoded_for, ref_emb = model, encoder.encode(references)
        scores = text.knn_precision_recall(
            ref_emb, encoder.encode(texts), k=cfg.text.k, explained_variance=cfg.text.explained_variance, seed=cfg.seed
        )
        rows.append({"model": model, "temperature": t, **scores, "num_texts": len(texts)})
    return rows


def aggregate(cfg: SweepConfig, num_shards: int | None = None) -> dict:
    """Read the ``num_shards`` shard files (default ``cfg.num_shards``) and write ``sweep.csv``,
    ``sweep.json`` (rows, per-model summary, PR curves) and ``pr_curve.png`` in ``cfg.output_dir``.
    Returns the ``sweep.json`` content."""
    from recall_dist.eval import plot

    num_shards = num_shards or cfg.num_shards
    if not num_shards:
        raise ValueError("aggregate needs num_shards (argument or cfg.num_shards)")
    records = _load_records(cfg, num_shards)
    lambdas = np.asarray(cfg.lambdas) if cfg.lambdas is not None else metrics.default_lambdas()
    curves = {}
    if cfg.metric == "known_support":
        rows, curves = _known_support_rows(cfg, records, lambdas)
        columns = [c for c in KNOWN_SUPPORT_COLUMNS if c in rows[0]]
    else:
        rows, columns = _text_rows(cfg, records), TEXT_COLUMNS
    summaries = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        summaries[model] = summary.summarize(
            [r["temperature"] for r in mine],
            [r["precision"] for r in mine],
            [r["recall"] for r in mine],
            cfg.min_precision,
        )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result = {
        "metric": cfg.metric,
        "task": cfg.task,
        "task_params": cfg.task_params,
        "rows": rows,
        "summary": summaries,
        "lambdas": lambdas.tolist(),
        "pr_curves": [{"model": m, "temperature": t, **c} for (m, t), c in curves.items()],
    }
    with open(out / "sweep.json", "w") as f:
        json.dump(result, f, indent=1)
    plot.plot_sweep(result, out / "pr_curve.png")
    return result
