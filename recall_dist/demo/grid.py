"""``recall-dist demo --grid``: TruncR and lambda-PR over a small grid of their settings, on the
demo's task and sizes, against NLL and c-Div fine-tuned from the same pre-trained model.

TruncR: drop in {0.1, 0.2, 0.3, 0.5} x granularity token / sequence.  lambda-PR: lam in
{0.3, 0.5, 0.8, 0.95} x nll_mix in {0, 0.5, 0.9}, and the variant against a reference softened
towards the model's own detached conditional, (1 - beta) delta_y + beta Q: the same rule at
lam' = lam (1 - beta) / (1 - lam beta) (docs/lambda_pr_reference.md), run from lam = 0.3 with
beta in {0.5, 0.75} (lam' = 0.176, 0.097: below the one-hot grid) x nll_mix in {0.5, 0.9}.

The report (``grid.md``, ``grid.csv``) ranks each family by Recall at Precision >= 0.99 (ties
within the demo's tolerance broken by Recall at Precision >= 0.995) and states the best setting's
margin over NLL, or that none gains.

A third family, ``PRECISION``, holds the Precision-side rules (``losses/prob_rules.py``): DFT,
Li et al.'s prob_power (alpha 3, 10) and prob_threshold (tau 0.1, top, objectives p and log_p), and
cdiv at alpha 0.5 and 0.8.  Its report, ``precision_rules.md`` / ``precision_rules.csv``, places
each on the PR plane against NLL: Precision and Recall at T = 1, max Recall, Recall at P >= 0.99.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from recall_dist.demo.pipeline import Setting
from recall_dist.demo.report import PRECISION_LEVELS
from recall_dist.demo.verdicts import PRECISION_TOLERANCE, TOLERANCE, dominance, read_curves, recall_at

REFERENCES = [Setting("nll", "nll"), Setting("cdiv-1.4", "cdiv", {"alpha": 1.4})]
TRUNCR = [
    Setting(f"truncr-{granularity[:3]}-{drop:g}", "truncr", {"drop": drop, "granularity": granularity})
    for granularity in ("token", "sequence")
    for drop in (0.1, 0.2, 0.3, 0.5)
]
LAMBDA_PR = [
    Setting(f"lambda_pr-{lam:g}-mix{mix:g}", "lambda_pr", {"lam": lam, "nll_mix": mix})
    for lam in (0.3, 0.5, 0.8, 0.95)
    for mix in (0.0, 0.5, 0.9)
]


def softened_lam(lam: float, beta: float) -> float:
    """The threshold of lambda-PR against the reference (1 - beta) delta_y + beta sg(Q), lam < 1."""
    return lam * (1 - beta) / (1 - lam * beta)


LAMBDA_PR += [
    Setting(
        f"lambda_pr-soft{beta:g}-mix{mix:g}", "lambda_pr", {"lam": round(softened_lam(0.3, beta), 4), "nll_mix": mix}
    )
    for beta in (0.5, 0.75)
    for mix in (0.5, 0.9)
]
# Precision-side rules: each down-weights targets the model finds unlikely.
PRECISION = [
    Setting("dft", "dft"),
    *[Setting(f"prob_power-{alpha:g}", "prob_power", {"alpha": alpha}) for alpha in (3.0, 10.0)],
    *[
        Setting(f"prob_threshold-{objective}-top-{tau:g}", "prob_threshold", {"tau": tau, "objective": objective})
        for objective in ("p", "log_p")
        for tau in (0.1,)
    ],
    *[Setting(f"cdiv-{alpha:g}", "cdiv", {"alpha": alpha}) for alpha in (0.5, 0.8)],
]
GRID = REFERENCES + TRUNCR + LAMBDA_PR + PRECISION
FAMILIES = {"truncr": TRUNCR, "lambda_pr": LAMBDA_PR}
RANK_LEVEL, TIE_LEVEL = 0.99, 0.995


def _score(points) -> tuple[float, float]:
    """Sort key of a model: Recall at Precision >= 0.99, then >= 0.995 (n/a counts as -1)."""
    return tuple(-1.0 if math.isnan(r) else r for r in (recall_at(points, RANK_LEVEL), recall_at(points, TIE_LEVEL)))


def grid_rows(curves: dict, reference: str = "nll") -> list[dict]:
    """One row per grid model: its settings, Recall at each Precision level, max Recall, the margin
    over ``reference`` at each level and the dominance verdict."""
    ref = curves[reference]
    rows = []
    for s in GRID:
        if s.name not in curves:
            continue
        name, points = s.name, curves[s.name]
        row = {"model": name, "loss": s.loss, "params": json.dumps(s.params, sort_keys=True)}
        for p in PRECISION_LEVELS:
            row[f"recall_at_p{p:g}"] = recall_at(points, p)
            row[f"margin_at_p{p:g}"] = recall_at(points, p) - recall_at(ref, p)
        row["max_recall"] = max(r for _, _, r in points)
        row["verdict"] = "reference" if name == reference else dominance(points, ref)["verdict"]
        rows.append(row)
    return rows


def best_of(curves: dict, family: str) -> str | None:
    """The family's best grid model by (Recall at P >= 0.99, then at P >= 0.995); ties within the
    demo's tolerance at 0.99 go to the better 0.995 value."""
    names = [s.name for s in FAMILIES[family] if s.name in curves]
    if not names:
        return None
    top = max(_score(curves[n])[0] for n in names)
    close = [n for n in names if _score(curves[n])[0] >= top - TOLERANCE]
    return max(close, key=lambda n: _score(curves[n])[1])


def _cell(x: float, signed: bool = False) -> str:
    return "n/a" if math.isnan(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def grid_markdown(curves: dict, recipe=None, reference: str = "nll") -> str:
    """grid.md: every grid model's row, then the best setting of each family against NLL."""
    rows = {r["model"]: r for r in grid_rows(curves, reference)}
    lines = ["# TruncR and lambda-PR over a grid of settings (demo task)", ""]
    if recipe is not None:
        lines += [
            f"Products a*b, a, b ~ U{{1..{recipe.max_factor}}}; every model is fine-tuned for "
            f"{recipe.finetune_steps} steps from the same NLL pre-trained model (same data, seed and learning "
            f"rate as the demo), then swept over T in {{{', '.join(f'{t:g}' for t in recipe.temperatures)}}} "
            f"with exact Precision and Recall@{recipe.recall_at_n}. One seed per setting: differences within "
            f"about {TOLERANCE:g} are ties (see the demo's seed spread). Computed by `recall_dist/demo/grid.py` "
            f"from the grid's `sweep.csv` (kept as `docs/demo/grid_sweep.csv`).",
            "",
        ]
    header = ["model", "settings", *[f"R @ P>={p:g}" for p in PRECISION_LEVELS], "max R"]
    header += [f"vs NLL @ P>={p:g}" for p in (RANK_LEVEL, TIE_LEVEL)] + ["verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, f"`{row['params']}`", *[_cell(row[f"recall_at_p{p:g}"]) for p in PRECISION_LEVELS]]
        cells += [_cell(row["max_recall"])]
        cells += [_cell(row[f"margin_at_p{p:g}"], signed=True) for p in (RANK_LEVEL, TIE_LEVEL)]
        lines.append("| " + " | ".join([*cells, row["verdict"]]) + " |")
    lines += ["", "## Best setting of each family", ""]
    for family in FAMILIES:
        best = best_of(curves, family)
        if best is None:
            continue
        b = rows[best]
        gain = b[f"margin_at_p{RANK_LEVEL:g}"]
        if gain > TOLERANCE:
            verdict = f"gains {gain:+.3f} over NLL at P >= {RANK_LEVEL:g}"
        elif gain >= -TOLERANCE:
            verdict = f"ties NLL at P >= {RANK_LEVEL:g} ({gain:+.3f})"
        else:
            verdict = f"no setting gains: the best is still {gain:+.3f} below NLL at P >= {RANK_LEVEL:g}"
        line = f"- **{family}**: best `{b['params']}` ({best}): {verdict}, {b[f'margin_at_p{TIE_LEVEL:g}']:+.3f} at "
        line += f"P >= {TIE_LEVEL:g}; verdict vs NLL + temperature: {b['verdict']}."
        lines.append(line)
    lines += [
        "",
        "The Precision-side family (dft, prob_power, prob_threshold, cdiv alpha < 1) has its own report: "
        "[precision_rules.md](precision_rules.md).",
    ]
    return "\n".join(lines) + "\n"


def _at_t1(points) -> tuple[float, float]:
    """(Precision, Recall) at the grid temperature closest to 1."""
    _, p, r = min(points, key=lambda point: abs(point[0] - 1.0))
    return p, r


def precision_rows(curves: dict, reference: str = "nll") -> list[dict]:
    """One row per model of ``reference`` + ``PRECISION`` in the sweep: Precision and Recall at T = 1,
    max Recall, Recall at P >= 0.99, their differences from ``reference``, the reference's Recall at
    the model's Precision at T = 1 (NLL + temperature there) and the dominance verdict."""
    ref = curves[reference]
    ref_p, ref_r = _at_t1(ref)
    rows = []
    for s in [REFERENCES[0], *PRECISION]:
        if s.name not in curves:
            continue
        name, points = s.name, curves[s.name]
        p1, r1 = _at_t1(points)
        r99 = recall_at(points, RANK_LEVEL)
        rows.append(
            {
                "model": name,
                "loss": s.loss,
                "params": json.dumps(s.params, sort_keys=True),
                "precision_t1": p1,
                "recall_t1": r1,
                "max_recall": max(r for _, _, r in points),
                f"recall_at_p{RANK_LEVEL:g}": r99,
                "delta_precision_t1": p1 - ref_p,
                "delta_recall_t1": r1 - ref_r,
                # What temperature alone does: NLL's best Recall at Precision >= this model's at T = 1.
                "nll_recall_at_same_precision": recall_at(ref, p1),
                f"margin_at_p{RANK_LEVEL:g}": r99 - recall_at(ref, RANK_LEVEL),
                "verdict": "reference" if name == reference else dominance(points, ref)["verdict"],
            }
        )
    return rows


def reproduce_command(curves: dict) -> str:
    """The command that trains and sweeps the grid models of ``curves`` (nll is always included)."""
    names = [s.name for s in GRID if s.name in curves]
    if len(names) == len(GRID):
        return "make demo-grid"
    return "recall-dist demo --grid --only " + ",".join(n for n in names if n != "nll")


def _precision_reading(rows: list[dict]) -> list[str]:
    """What the rows say about the claim: higher Precision at T = 1 than NLL, and less Recall."""
    rules = [r for r in rows if r["verdict"] != "reference"]
    up = [r["model"] for r in rules if r["delta_precision_t1"] > PRECISION_TOLERANCE]
    down = [r["model"] for r in rules if r["delta_recall_t1"] < -TOLERANCE]
    both = [m for m in up if m in down]
    lines = [
        f"- Higher Precision at T = 1 than NLL (by more than {PRECISION_TOLERANCE:g}): {len(up)} of {len(rules)}"
        + (f" ({', '.join(up)})" if up else "")
        + ".",
        f"- Lower Recall at T = 1 than NLL (by more than {TOLERANCE:g}): {len(down)} of {len(rules)}"
        + (f" ({', '.join(down)})" if down else "")
        + ".",
        f"- Both (the expected Precision-side trade at T = 1): {len(both)} of {len(rules)}.",
    ]
    for r in rules:
        lines.append(
            f"- **{r['model']}**: P {r['precision_t1']:.4f} ({r['delta_precision_t1']:+.4f}), R "
            f"{r['recall_t1']:.3f} ({r['delta_recall_t1']:+.3f}) at T = 1; R @ P>={RANK_LEVEL:g} "
            f"{_cell(r[f'recall_at_p{RANK_LEVEL:g}'])} ({_cell(r[f'margin_at_p{RANK_LEVEL:g}'], True)}); "
            f"NLL cooled to the same Precision: R {_cell(r['nll_recall_at_same_precision'])}; "
            f"vs NLL + temperature: {r['verdict']}."
        )
    return lines


def precision_markdown(curves: dict, recipe=None, reference: str = "nll") -> str:
    """precision_rules.md: where each Precision-side rule lands on the PR plane, against NLL."""
    rows = precision_rows(curves, reference)
    lines = ["# Precision-side rules on the PR plane (demo task)", ""]
    if recipe is not None:
        lines += [
            f"Products a*b, a, b ~ U{{1..{recipe.max_factor}}}; every model is fine-tuned for "
            f"{recipe.finetune_steps} steps from the same NLL pre-trained model (same data, seed and learning "
            f"rate as the demo), then swept over T in {{{', '.join(f'{t:g}' for t in recipe.temperatures)}}} "
            f"with exact Precision and Recall@{recipe.recall_at_n}. One seed per setting: Recall differences "
            f"within about {TOLERANCE:g} are ties.",
            "",
        ]
    lines += [
        f"Produced by `{reproduce_command(curves)}` (pre-training included); every number is computed by "
        "`recall_dist/demo/grid.py` from that run's `sweep.csv` (kept as `docs/demo/precision_sweep.csv`).",
        "",
    ]
    header = ["model", "settings", "P @ T=1", "R @ T=1", "max R", f"R @ P>={RANK_LEVEL:g}"]
    header += ["ΔP @ T=1 vs NLL", "ΔR @ T=1 vs NLL", "NLL's R at this P", f"vs NLL @ P>={RANK_LEVEL:g}"]
    header += ["verdict"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], f"`{r['params']}`", f"{r['precision_t1']:.4f}", f"{r['recall_t1']:.3f}"]
        cells += [f"{r['max_recall']:.3f}", _cell(r[f"recall_at_p{RANK_LEVEL:g}"])]
        cells += [f"{r['delta_precision_t1']:+.4f}", f"{r['delta_recall_t1']:+.3f}"]
        cells += [_cell(r["nll_recall_at_same_precision"])]
        cells += [_cell(r[f"margin_at_p{RANK_LEVEL:g}"], signed=True), r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "NLL's R at this P: NLL's best Recall over its temperature curve at Precision >= the model's Precision "
        "at T = 1 (what lowering NLL's temperature buys at that Precision). Verdict: as in grid.md.",
        "",
        "## What was measured",
        "",
        *_precision_reading(rows),
    ]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_grid_report(csv_path: Path, out_dir: Path, recipe=None) -> Path:
    """Write ``grid.md`` and ``grid.csv`` (one row per grid model) next to the sweep, and
    ``precision_rules.md`` / ``.csv`` when Precision-side models ran; return grid.md's path."""
    curves = read_curves(csv_path)
    _write_csv(out_dir / "grid.csv", grid_rows(curves))
    path = out_dir / "grid.md"
    path.write_text(grid_markdown(curves, recipe))
    if any(s.name in curves for s in PRECISION):
        _write_csv(out_dir / "precision_rules.csv", precision_rows(curves))
        (out_dir / "precision_rules.md").write_text(precision_markdown(curves, recipe))
    return path
