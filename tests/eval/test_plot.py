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


def test_seeds_of_one_loss_share_a_colour_and_differ_in_line_style(tmp_path, monkeypatch):
    """15 curves (5 losses x 3 seeds) would cycle through matplotlib's 10 colours and give two losses one
    colour; the figure instead colours by the rows' ``family`` and draws each ``seed`` in its own line style."""
    losses = ("nll", "cdiv-1.4", "cdiv-2.0", "truncr", "lambda_pr")
    labels = {f"{loss}-s{seed}": {"family": loss, "seed": seed} for seed in range(3) for loss in losses}
    models = list(labels)
    rows = [
        {"model": m, **labels[m], "temperature": t, "precision": 0.9 - 0.01 * i, "recall": 0.5 + 0.01 * i}
        | {"recall_at_n": 8}
        for i, m in enumerate(models)
        for t in (0.8, 1.2)
    ]
    summary = {m: {"max_recall": 0.5, "pr_auc": 0.5} for m in models}
    drawn = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, *args, **kwargs):
        for line in fig.axes[0].get_lines():
            drawn[line.get_label().split()[0]] = (line.get_color(), line.get_linestyle())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    plot.plot_sweep({"metric": "text", "task": "t", "rows": rows, "summary": summary}, tmp_path / "pr.png")
    assert set(drawn) == set(models)
    for loss in ("nll", "cdiv-1.4", "cdiv-2.0", "truncr", "lambda_pr"):
        assert len({drawn[f"{loss}-s{k}"][0] for k in range(3)}) == 1, loss  # one colour per loss
        assert len({drawn[f"{loss}-s{k}"][1] for k in range(3)}) == 3, loss  # a line style per seed
    assert len({drawn[f"{loss}-s0"][0] for loss in ("nll", "cdiv-1.4", "cdiv-2.0", "truncr", "lambda_pr")}) == 5
    # without seeds every model keeps its own colour and a solid line
    drawn.clear()
    plain = [
        {k: v for k, v in r.items() if k not in ("family", "seed")} | {"model": r["family"]}
        for r in rows
        if r["seed"] == 0
    ]
    names = [m.replace("-s0", "") for m in models[:5]]
    plot.plot_sweep(
        {"metric": "text", "task": "t", "rows": plain, "summary": {m: summary[m + "-s0"] for m in names}},
        tmp_path / "plain.png",
    )
    assert len({c for c, _ in drawn.values()}) == 5 and {s for _, s in drawn.values()} == {"-"}


def test_styles_read_the_seed_field_never_the_name():
    """A model named ``foo-s3`` without a seed field is a model of its own, not seed 3 of ``foo`` (the old
    rule parsed ``-s<k>`` out of names); with the fields, the family and the seed decide the style."""
    unlabelled = plot.model_styles([{"model": "foo-s3"}, {"model": "foo-s0"}, {"model": "foo"}])
    assert len({s["color"] for s in unlabelled.values()}) == 3 and {s["linestyle"] for s in unlabelled.values()} == {
        "-"
    }
    labelled = plot.model_styles(
        [
            {"model": "a", "family": "foo", "seed": 3},
            {"model": "b", "family": "foo", "seed": 0},
            {"model": "foo-s3", "family": None, "seed": None},
        ]
    )
    assert labelled["a"]["color"] == labelled["b"]["color"] != labelled["foo-s3"]["color"]
    assert labelled["a"]["linestyle"] == plot.LINESTYLES[3] and labelled["b"]["linestyle"] == plot.LINESTYLES[0]
    assert labelled["foo-s3"]["linestyle"] == plot.LINESTYLES[0]  # no seed: styled as seed 0 of its own family
