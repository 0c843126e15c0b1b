"""The sweep's PR-curve figure: one curve per model, Recall on x, Precision on y, each point
labelled by its temperature.  Known-support sweeps get a second panel: the PR curves
(beta_lam, alpha_lam) of every model at the temperature closest to 1."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: ranks and CI have no display
import matplotlib.cm
import matplotlib.colors
import matplotlib.pyplot as plt

MARKERS = "osD^vP*X"
LINESTYLES = ("-", "--", ":", "-.")


def model_styles(rows: list[dict]) -> dict[str, dict]:
    """A style per model of a sweep's ``rows``: a colour per model; when models carry a ``seed`` (the sweep's
    model entries set it, ``ModelSpec``), a colour per ``family`` (e.g. the loss) and a line style and marker
    per seed, so the seeds of one loss read as one family.  A model's name is never parsed for a seed."""
    labels = {r["model"]: (r.get("family") or r["model"], r.get("seed")) for r in rows}
    families = list(dict.fromkeys(family for family, _ in labels.values()))
    seeded = any(seed is not None for _, seed in labels.values())
    styles = {}
    for i, (model, (family, seed)) in enumerate(labels.items()):
        if seeded:
            k, j = families.index(family), seed or 0
            styles[model] = {
                "color": f"C{k % 10}",
                "marker": MARKERS[j % len(MARKERS)],
                "linestyle": LINESTYLES[j % len(LINESTYLES)],
            }
        else:
            styles[model] = {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "linestyle": "-"}
    return styles


def _limits(values: list[float]) -> tuple[float, float]:
    """Zoom on the data (PR plots are often crowded near Precision or Recall 1), within [0, 1]."""
    lo, hi = min(values), max(values)
    pad = max(0.08 * (hi - lo), 0.02)
    lo, hi = max(lo - pad, 0.0), min(hi + pad, 1.0)
    if hi - lo < 0.1:  # never zoom so far that noise looks like a trend
        mid = (lo + hi) / 2
        lo, hi = max(min(mid - 0.05, 0.9), 0.0), min(max(mid + 0.05, 0.1), 1.0)
    return lo - 0.01, hi + 0.01


def _sweep_panel(fig, ax, result: dict) -> None:
    rows_all = result["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows_all))
    temps = sorted({r["temperature"] for r in rows_all})
    norm = matplotlib.colors.Normalize(min(temps), max(temps) if len(temps) > 1 else min(temps) + 1)
    cmap = plt.get_cmap("plasma")
    xlim, ylim = _limits([r["recall"] for r in rows_all]), _limits([r["precision"] for r in rows_all])
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    placed: list[tuple[float, float]] = []
    styles = model_styles(rows_all)
    for model in models:
        rows = sorted((r for r in rows_all if r["model"] == model), key=lambda r: r["temperature"])
        s, style = result["summary"][model], styles[model]
        xs, ys = [r["recall"] for r in rows], [r["precision"] for r in rows]
        ax.plot(
            xs,
            ys,
            style["linestyle"],
            color=style["color"],
            lw=1.8,
            zorder=1,
            label=f"{model}  (max R {s['max_recall']:.3f}, AUC {s['pr_auc']:.3f})",
        )
        ax.scatter(
            xs,
            ys,
            c=[r["temperature"] for r in rows],
            cmap=cmap,
            norm=norm,
            s=55,
            marker=style["marker"],
            edgecolors=style["color"],
            linewidths=1.5,
            zorder=2,
        )
        for r in rows:
            # Label a point unless another label already sits within ~4% of the axes (crowded curves
            # stay readable; the colour bar still gives every point's T).
            fx = (r["recall"] - xlim[0]) / (xlim[1] - xlim[0])
            fy = (r["precision"] - ylim[0]) / (ylim[1] - ylim[0])
            if all((fx - px) ** 2 + (fy - py) ** 2 > 0.045**2 for px, py in placed):
                placed.append((fx, fy))
                ax.annotate(
                    f"T={r['temperature']:g}",
                    (r["recall"], r["precision"]),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=8,
                    color=style["color"],
                )
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="temperature T", pad=0.02)
    if result["metric"] == "text":
        ax.set_xlabel("k-NN Recall")
        ax.set_ylabel("k-NN Precision")
    else:
        ax.set_xlabel(f"Recall@{rows_all[0]['recall_at_n']}  (expected P-mass covered by N samples)")
        ax.set_ylabel("Precision  Q_T(supp P)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Temperature sweep ({_subject(result)})")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)


def _subject(result: dict) -> str:
    """What the sweep measured against: a text sweep's references file (``k-NN P/R vs heldout.jsonl``),
    the task's samples for a text sweep without one, or the task's exact distribution."""
    if result["metric"] == "text":
        refs = result.get("references")
        return f"k-NN P/R vs {Path(refs).name}" if refs else f"k-NN P/R vs {result['task']} samples"
    return result["task"]


def _pr_curve_panel(ax, result: dict) -> None:
    temps = sorted({c["temperature"] for c in result["pr_curves"]})
    t_ref = min(temps, key=lambda t: abs(t - 1.0))
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    styles = model_styles(result["rows"])
    for model in models:
        curve = next(c for c in result["pr_curves"] if c["model"] == model and c["temperature"] == t_ref)
        style = styles[model]
        ax.plot(curve["beta"], curve["alpha"], style["linestyle"], color=style["color"], lw=1.8, label=model)
    ax.set_xlabel("recall  beta_lambda")
    ax.set_ylabel("precision  alpha_lambda")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"PR curve of Q_T vs P at T={t_ref:g}")
    ax.legend(loc="best", fontsize=8, framealpha=0.85)


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Write the figure of a ``sweep.json``-shaped ``result`` to ``path`` (PNG) and return the path."""
    panels = 2 if result.get("pr_curves") else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5.5), squeeze=False)
    _sweep_panel(fig, axes[0, 0], result)
    if panels == 2:
        _pr_curve_panel(axes[0, 1], result)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
