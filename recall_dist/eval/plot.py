"""The sweep's PR-curve figure: one curve per model, Recall on x, Precision on y, each point
labelled by its temperature.  Known-support sweeps get a second panel: the PR curves
(beta_lam, alpha_lam) of every model at the temperature closest to 1."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: ranks and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def _sweep_panel(ax, result: dict) -> None:
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for i, model in enumerate(models):
        rows = sorted((r for r in result["rows"] if r["model"] == model), key=lambda r: r["temperature"])
        color = f"C{i}"
        s = result["summary"][model]
        ax.plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", color=color, lw=1.8, ms=5,
                label=f"{model}  (max R {s['max_recall']:.2f}, AUC {s['pr_auc']:.3f})")
        for j, r in enumerate(rows):
            # Alternate label sides so neighbouring temperatures do not overwrite each other.
            dy = 7 if (i + j) % 2 == 0 else -13
            ax.annotate(f"T={r['temperature']:g}", (r["recall"], r["precision"]), textcoords="offset points",
                        xytext=(5, dy), fontsize=8, color=color)
    recall_name = "k-NN Recall" if result["metric"] == "text" else "Recall@N"
    precision_name = "k-NN Precision" if result["metric"] == "text" else "Precision  Q_T(supp P)"
    ax.set_xlabel(recall_name)
    ax.set_ylabel(precision_name)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"Temperature sweep ({result['task']})")
    ax.legend(loc="lower left", fontsize=8)


def _pr_curve_panel(ax, result: dict) -> None:
    temps = sorted({c["temperature"] for c in result["pr_curves"]})
    t_ref = min(temps, key=lambda t: abs(t - 1.0))
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for i, model in enumerate(models):
        curve = next(c for c in result["pr_curves"] if c["model"] == model and c["temperature"] == t_ref)
        ax.plot(curve["beta"], curve["alpha"], "-", color=f"C{i}", lw=1.8, label=model)
    ax.set_xlabel("recall  beta_lambda")
    ax.set_ylabel("precision  alpha_lambda")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"PR curve of Q_T vs P at T={t_ref:g}")
    ax.legend(loc="lower left", fontsize=8)


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Write the figure of a ``sweep.json``-shaped ``result`` to ``path`` (PNG) and return the path."""
    panels = 2 if result.get("pr_curves") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5), squeeze=False)
    _sweep_panel(axes[0, 0], result)
    if panels == 2:
        _pr_curve_panel(axes[0, 1], result)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
