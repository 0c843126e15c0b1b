"""Known-support numbers per prompt and their spread over prompts: ``sweep_prompts.csv`` (one row per
model, temperature and prompt) and the spread columns of ``sweep.csv`` next to the P(prompt)-weighted
mean (``aggregate.py``).  A support file weighs its prompts equally, so there the mean is the plain
mean over prompts and the std the population std."""

from __future__ import annotations

import numpy as np

PROMPT_COLUMNS = ["model", "temperature", "prompt_index", "prompt", "weight", "precision", "recall", "recall_at_n"]
SPREAD_OF = ("precision", "recall")


def spread(name: str, w: np.ndarray, values: list[float]) -> dict[str, float]:
    """``{name}_std`` (weighted by ``w``, about the weighted mean), ``{name}_min`` and ``{name}_max`` of one
    metric over the prompts."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(np.sum(w * v) / w.sum())
    std = float(np.sqrt(np.sum(w * (v - mean) ** 2) / w.sum()))
    return {f"{name}_std": std, f"{name}_min": float(v.min()), f"{name}_max": float(v.max())}


def spread_columns() -> list[str]:
    return [f"{name}_{stat}" for name in SPREAD_OF for stat in ("std", "min", "max")]


def prompt_rows(models: list[str], temperatures: list[float], records: list[dict], recall_at_n: int) -> list[dict]:
    """One row per (model, temperature, prompt) from the shards' known-support records (work-item
    order), prompts numbered in their order within the model."""
    rows = []
    for model in models:
        recs = [r for r in records if r["model"] == model]
        for k, t in enumerate(temperatures):
            for i, r in enumerate(recs):
                at_t = r["temperatures"][k]
                rows.append(
                    {
                        "model": model,
                        "temperature": t,
                        "prompt_index": i,
                        "prompt": r["prompt"],
                        "weight": r["weight"],
                        "precision": at_t["precision"],
                        "recall": at_t["recall"],
                        "recall_at_n": recall_at_n,
                    }
                )
    return rows
