"""The sweep's figure (recall_dist/eval/plot.py): a PNG with one curve per model, a second panel for
known-support sweeps, and a title that names what the sweep was scored against."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from recall_dist.eval import plot


def _result(metric: str, references: str | None = None) -> dict:
    rows = [
        {"model": m, "temperature": t, "precision": p, "recall": r, "recall_at_n": 8}
        for m, pts in {"nll": [(0.8, 0.95, 0.5), (1.2, 0.8, 0.6)], "cdiv": [(0.8, 0.9, 0.7), (1.2, 0.7, 0.8)]}.items()
        for t, p, r in pts
    ]
    summary = {
        m: {"max_recall": max(r["recall"] for r in rows if r["model"] == m), "pr_auc": 0.5} for m in ("nll", "cdiv")
    }
    result = {"metric": metric, "task": "product", "references": references, "rows": rows, "summary": summary}
    if metric != "text":
        result["pr_curves"] = [
            {"model": m, "temperature": t, "alpha": [1.0, 0.5, 0.0], "beta": [0.0, 0.5, 1.0]}
            for m in ("nll", "cdiv")
            for t in (0.8, 1.2)
        ]
    return result


@pytest.mark.parametrize(
    ("metric", "references", "title"),
    [
        ("text", "/data/run/heldout.jsonl", "Temperature sweep (k-NN P/R vs heldout.jsonl)"),
        ("text", None, "Temperature sweep (k-NN P/R vs product samples)"),
        ("known_support", None, "Temperature sweep (product)"),
    ],
)
def test_title_names_what_was_measured(metric, references, title, tmp_path, monkeypatch):
    titles = []
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):  # read the titles off the real figure before it is closed
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    path = plot.plot_sweep(_result(metric, references), tmp_path / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles[0] == title
    # known-support sweeps get the PR-curve panel at the temperature closest to 1
    assert len(titles) == (1 if metric == "text" else 2)
