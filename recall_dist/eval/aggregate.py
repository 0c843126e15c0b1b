"""Aggregate a sweep's shard files into the tables: ``sweep.csv``, ``sweep.json`` and ``pr_curve.png``.

Known-support metrics are P(prompt)-weighted averages over prompts: the shards hold per-prompt
numbers at every temperature, and here every (model, T) sums ``w * value`` and ``w`` in work-item
order and divides once (variances: ``sum w^2 var / (sum w)^2``).

Text metrics are not sums over work items: each (model, T) group needs all its generations and
references at once (PCA on their union, k-NN balls).  The groups are spread over ranks as
*parts* (``compute_text_part``: group g goes to part g mod num_parts), each writing the integer
k-NN counts of its groups; ``aggregate`` adds the counts and divides once.  Embeddings were
computed with the shards (``sweep.py``), so a part only counts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from recall_dist.eval import prompt_table, summary, text
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.shards import (
    decode_array,
    model_fingerprint,
    read_json_if_key,
    read_shard,
    work_items,
    write_json_atomic,
)

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
    *prompt_table.spread_columns(),  # over the prompts: std about the weighted mean, min, max
]
TEXT_COLUMNS = ["model", "temperature", "precision", "recall", "density", "coverage", "num_texts"]
# A model entry's report labels (``ModelSpec.seed`` / ``family``), columns only when some model sets one.
LABEL_COLUMNS = ["family", "seed"]


def load_records(cfg: SweepConfig, num_shards: int) -> list[dict]:
    """Every work item's record from the ``num_shards`` shard files, in work-item order."""
    records, missing = [], []
    for s in range(num_shards):
        data = read_shard(cfg, s, num_shards)
        if data is None:
            missing.append(s)
        else:
            records += data["records"]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {num_shards} shards missing or computed with another config or other "
            f"model contents under {Path(cfg.output_dir) / 'shards'}: {missing[:10]}"
        )
    records.sort(key=lambda r: r["item"])
    expected = len(work_items(cfg))
    if [r["item"] for r in records] != list(range(expected)):
        raise ValueError(f"shards hold {len(records)} work items, expected {expected} distinct ones")
    return records


def _weighted_mean(w: np.ndarray, values: list[float]) -> float:
    return float(sum(wi * v for wi, v in zip(w, values, strict=True)) / w.sum())


def _weighted_se(w: np.ndarray, variances: list[float]) -> float:
    return float(np.sqrt(sum(wi * wi * v for wi, v in zip(w, variances, strict=True))) / w.sum())


def _known_support_rows(cfg: SweepConfig, records: list[dict], lambdas: np.ndarray) -> tuple[list, dict]:
    rows, curves = [], {}
    for model in cfg.models:
        recs = [r for r in records if r["model"] == model.name]
        w = np.array([r["weight"] for r in recs])
        for k, t in enumerate(cfg.temperatures):
            at_t = [r["temperatures"][k] for r in recs]
            row = {
                "model": model.name,
                "temperature": t,
                "precision": _weighted_mean(w, [r["precision"] for r in at_t]),
                "recall": _weighted_mean(w, [r["recall"] for r in at_t]),
                "recall_at_n": cfg.recall_at_n,
                "num_samples": cfg.num_samples,
                "num_prompts": len(recs),
            }
            if len(recs) > 1:  # the spread over prompts next to their mean (a one-prompt task has none)
                for name in prompt_table.SPREAD_OF:
                    row.update(prompt_table.spread(name, w, [r[name] for r in at_t]))
            if cfg.num_samples > 0:
                row.update(
                    precision_sampled=_weighted_mean(w, [r["precision_sampled"] for r in at_t]),
                    precision_sampled_se=_weighted_se(w, [r["precision_sampled_var"] for r in at_t]),
                    recall_sampled=_weighted_mean(w, [r["recall_sampled"] for r in at_t]),
                    recall_sampled_se=_weighted_se(w, [r["recall_sampled_var"] for r in at_t]),
                    recall_at_num_samples=_weighted_mean(w, [r["recall_at_num_samples"] for r in at_t]),
                )
            alpha = np.sum([wi * np.asarray(r["alpha"]) for wi, r in zip(w, at_t, strict=True)], axis=0) / w.sum()
            curves[(model.name, t)] = {"alpha": alpha.tolist(), "beta": (alpha / lambdas).tolist()}
            rows.append(row)
    return rows, curves


# ---------------------------------------------------------------------------------------------
# Text metrics: k-NN counts per (model, T) group, spread over parts.


def text_groups(cfg: SweepConfig) -> list[tuple[str, int]]:
    """The (model, temperature index) groups of a text sweep, in table order."""
    return [(m.name, k) for m in cfg.models for k in range(len(cfg.temperatures))]


def text_part_path(cfg: SweepConfig, part: int, num_parts: int) -> Path:
    return Path(cfg.output_dir) / "shards" / f"text-part-{part:05d}-of-{num_parts:05d}.json"


def _text_part_key(cfg: SweepConfig) -> dict:
    return {"config": cfg.fingerprint(), "models": {m.name: model_fingerprint(cfg, m) for m in cfg.models}}


def _group_embeddings(cfg: SweepConfig, records: list[dict], model: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(references, generations) embeddings of group (model, T index k), rows in reference order."""
    ref_model = model if cfg.text.encoder == "lm" else cfg.models[0].name
    refs = [decode_array(r["reference_embeddings"]) for r in records if r["model"] == ref_model]
    gens = [decode_array(r["temperatures"][k]["embeddings"]) for r in records if r["model"] == model]
    return np.concatenate(refs), np.concatenate(gens)


def read_text_part(cfg: SweepConfig, part: int, num_parts: int) -> dict | None:
    """Part ``part``'s content if it exists and was counted for this config and these models."""
    return read_json_if_key(text_part_path(cfg, part, num_parts), _text_part_key(cfg))


def compute_text_part(cfg: SweepConfig, part: int, num_parts: int, num_shards: int) -> Path:
    """Count the k-NN statistics of the text groups g with g mod ``num_parts`` == ``part`` and write
    them to ``text_part_path`` (resumable and atomic like a shard)."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part = {part}: must be in [0, {num_parts})")
    path, key = text_part_path(cfg, part, num_parts), _text_part_key(cfg)
    if read_text_part(cfg, part, num_parts) is not None:
        return path
    records = load_records(cfg, num_shards)
    counts = {}
    for g, (model, k) in enumerate(text_groups(cfg)):
        if g % num_parts == part:
            refs, gens = _group_embeddings(cfg, records, model, k)
            found = text.knn_counts(refs, gens, cfg.text.k, cfg.text.explained_variance, cfg.seed)
            counts[str(g)] = {**found, "num_real": len(refs), "num_fake": len(gens)}
    return write_json_atomic(path, {"key": key, "part": part, "num_parts": num_parts, "counts": counts})


def _text_rows(cfg: SweepConfig, num_shards: int, num_parts: int) -> list[dict]:
    counts: dict[str, dict] = {}
    for part in range(num_parts):
        path = compute_text_part(cfg, part, num_parts, num_shards)  # reads it back when already there
        counts.update(json.loads(path.read_text())["counts"])
    rows = []
    for g, (model, k) in enumerate(text_groups(cfg)):
        c = counts[str(g)]
        norm = text.normalisers(c["num_real"], c["num_fake"], cfg.text.k)
        scores = {name: c[name] / norm[name] for name in text.KNN_COUNTS}
        rows.append({"model": model, "temperature": cfg.temperatures[k], **scores, "num_texts": c["num_fake"]})
    return rows


# ---------------------------------------------------------------------------------------------


def aggregate(cfg: SweepConfig, num_shards: int | None = None, num_parts: int = 1) -> dict:
    """Read the ``num_shards`` shard files (default ``cfg.num_shards``) and write ``sweep.csv``,
    ``sweep.json`` (rows, per-model summary, PR curves) and ``pr_curve.png`` in ``cfg.output_dir``.
    Text sweeps read the ``num_parts`` k-NN part files, computing here any that is missing.
    Returns the ``sweep.json`` content."""
    from recall_dist.eval import plot

    num_shards = num_shards or cfg.num_shards
    if not num_shards:
        raise ValueError("aggregate needs num_shards (argument or cfg.num_shards)")
    lambdas = cfg.lambda_grid()
    curves, per_prompt = {}, []
    if cfg.metric == "known_support":
        records = load_records(cfg, num_shards)
        rows, curves = _known_support_rows(cfg, records, lambdas)
        columns = [c for c in KNOWN_SUPPORT_COLUMNS if c in rows[0]]
        names = [m.name for m in cfg.models]
        if len(records) > len(names):  # several prompts per model: their own table
            per_prompt = prompt_table.prompt_rows(names, cfg.temperatures, records, cfg.recall_at_n)
    else:
        rows, columns = _text_rows(cfg, num_shards, num_parts), TEXT_COLUMNS
    if any(m.seed is not None or m.family is not None for m in cfg.models):
        columns = [columns[0], *LABEL_COLUMNS, *columns[1:]]
        labels = {m.name: {"family": m.family or m.name, "seed": m.seed} for m in cfg.models}
        rows = [{**r, **labels[r["model"]]} for r in rows]
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
    if per_prompt:
        with open(out / "sweep_prompts.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=prompt_table.PROMPT_COLUMNS)
            writer.writeheader()
            writer.writerows(per_prompt)
    result = {
        "metric": cfg.metric,
        "task": cfg.task,
        "task_params": cfg.task_params,
        "support": cfg.support,  # a support file replaces the task's prompts and P
        # what the samples were scored against: the task's own distribution, or a text references file
        "references": cfg.text.references if cfg.metric == "text" else None,
        "rows": rows,
        "prompt_rows": per_prompt,
        "summary": summaries,
        "lambdas": lambdas.tolist(),
        "pr_curves": [{"model": m, "temperature": t, **c} for (m, t), c in curves.items()],
    }
    with open(out / "sweep.json", "w") as f:
        json.dump(result, f, indent=1)
    plot.plot_sweep(result, out / "pr_curve.png")
    return result
