"""``recall-dist demo``: the paper's claim, reproduced on CPU in minutes with the real trainer and sweep.

    recall-dist demo [--out results/demo] [--steps N] [--max-factor A] [--quick]

Three stages, each a ``torchrun --nproc-per-node 2`` subprocess of the real CLI (logs in ``OUT/logs/``):

1. **Pre-train** a tiny Llama (``configs/demo/tiny-llama-h64.yaml``) with NLL from scratch on the
   built-in ``product`` task (a, b ~ U{1..A}, completion str(a*b); A = 30 gives 308 valid products).
2. **Fine-tune** that model with each loss -- ``nll``, ``cdiv`` (alpha 1.4 and 2.0), ``truncr``,
   ``lambda_pr`` -- with the same data, seed, steps and learning rate (``configs/demo/finetune.yaml``).
   This is the paper's setting (fine-tuning pretrained models), and it makes the comparison fair:
   every model starts from the same point and differs only by its loss.  From-scratch runs of a few
   hundred steps leave every model at Precision < 0.9, where the comparison says little.
3. **Sweep** the temperature grid with 2 processes (``configs/demo/sweep.yaml``): exact Precision =
   Q_T(supp P) and Recall@N = sum_x P(x)(1 - (1 - Q_T(x))^N), N = 500 > the 308 products, so Recall
   measures coverage of the support, the regime where a flatter model *on* the support pays off.

Outputs in ``OUT``: ``pr_curve.png`` (the sweep's figure), ``pr_curve_zoom.png`` (the high-Precision
corner, 1 - Precision on a log axis), ``sweep.csv`` (one row per model and temperature), ``sweep.json``
and ``summary.md``, whose statements are computed from ``sweep.csv`` by ``write_summary`` (nothing is
hard-coded): whether NLL's Recall rises with T above 1, and whether each recall loss dominates NLL +
temperature (Recall at matched Precision).  ``--quick`` is the CI-sized run (tests/test_demo_smoke.py).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recall_dist.eval.summary import recall_at_precision

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "demo"

# (model name, loss name, loss params): the models the demo trains, NLL first (the reference).
LOSSES = [
    ("nll", "nll", {}),
    ("cdiv-1.4", "cdiv", {"alpha": 1.4}),
    ("cdiv-2.0", "cdiv", {"alpha": 2.0}),
    ("truncr", "truncr", {"drop": 0.5}),
    ("lambda_pr", "lambda_pr", {"lam": 0.5}),
]
PRECISION_LEVELS = (0.9, 0.95, 0.99, 0.995)
# Recall differences within TOLERANCE count as ties in the verdicts (the numbers are exact
# enumerations, but a re-run with another seed moves them by about this much).
TOLERANCE = 0.002
# A loss counts as reaching Precision P if it reaches P - PRECISION_TOLERANCE: at the cold end of the
# grid every model is at Precision 0.9999x, and a 2e-5 difference there says nothing about the losses.
PRECISION_TOLERANCE = 1e-4


@dataclass
class Recipe:
    """Sizes of one demo run (the full run, or ``--quick`` for CI)."""

    pretrain_steps: int = 3000
    finetune_steps: int = 500
    max_factor: int = 30
    recall_at_n: int = 500
    num_samples: int = 500
    temperatures: list[float] = field(default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0])
    losses: list[tuple] = field(default_factory=lambda: list(LOSSES))
    global_batch: int = 64

    @classmethod
    def quick(cls) -> Recipe:
        return cls(
            pretrain_steps=60,
            finetune_steps=10,
            max_factor=9,
            recall_at_n=50,
            num_samples=0,
            temperatures=[0.5, 1.0, 1.5, 2.0],
            losses=[LOSSES[0], LOSSES[1]],
        )


class DemoError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Running the stages: torchrun subprocesses of the real CLI, with a progress line per stage.


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _tqdm_progress(log: Path) -> str:
    """'123/500' from the last tqdm update in ``log`` (rank 0's bar), or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    found = re.findall(r"(\d+)/(\d+) \[", tail)
    return f"{found[-1][0]}/{found[-1][1]}" if found else ""


def _run_once(label: str, what: str, args: list[str], log: Path, demo_start: float) -> tuple[int, float]:
    """Run ``torchrun --nproc-per-node 2 -m recall_dist ARGS`` with its output in ``log``, printing
    progress; return (exit code, seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "recall_dist",
        *args,
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    start, last_print, tty = time.monotonic(), 0.0, sys.stdout.isatty()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                now = time.monotonic()
                if tty or now - last_print >= 15:
                    step = _tqdm_progress(log)
                    line = (
                        f"{label} {what}: {step or 'starting'}  ({_fmt_time(now - start)}, "
                        f"demo {_fmt_time(now - demo_start)})"
                    )
                    print(f"\r{line:<90}" if tty else line, end="" if tty else "\n", flush=True)
                    last_print = now
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if tty:
        print("\r" + " " * 90 + "\r", end="")
    return proc.returncode, time.monotonic() - start


def _run_stage(label: str, what: str, args: list[str], log: Path, demo_start: float, attempts: int = 2) -> float:
    """``_run_once``, retried once: a worker of the CPU gloo runs occasionally aborts in teardown
    after finishing (exit -6, "terminate called without an active exception"), so one retry, announced
    on the console, keeps the demo from dying of that.  A stage that fails twice raises ``DemoError``
    naming it and its log.  Returns the seconds of the successful attempt."""
    for attempt in range(1, attempts + 1):
        code, seconds = _run_once(label, what, args, log, demo_start)
        if code == 0:
            print(
                f"{label} {what}: done in {_fmt_time(seconds)}  (demo {_fmt_time(time.monotonic() - demo_start)})",
                flush=True,
            )
            return seconds
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        if attempt < attempts:
            kept = log.with_suffix(f".attempt{attempt}.log")
            log.replace(kept)
            print(f"{label} {what}: FAILED (exit code {code}, log {kept}); retrying once", flush=True)
    raise DemoError(
        f"{what} failed (exit code {code}, {attempts} attempts); full log: {log}\n--- last lines ---\n{tail}"
    )


def _yaml_flow(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


def run_pipeline(out: Path, recipe: Recipe) -> Path:
    """Train every model of ``recipe``, sweep them, write the outputs in ``out``; return summary.md's path."""
    demo_start = time.monotonic()
    runs, logs = out / "runs", out / "logs"
    for stale in (runs, out / "shards", out / "exported"):  # retrained models must not reuse old shards
        shutil.rmtree(stale, ignore_errors=True)
    task = f"data.task_params={{max_factor: {recipe.max_factor}}}"
    stages = 2 + len(recipe.losses)
    print(
        f"recall-dist demo: {len(recipe.losses)} losses on products of integers in [1, {recipe.max_factor}], "
        f"2 processes; pre-train {recipe.pretrain_steps} steps, fine-tune {recipe.finetune_steps} steps each; "
        f"output in {out}",
        flush=True,
    )
    pretrain = runs / "pretrain"
    _run_stage(
        f"[1/{stages}]",
        f"pre-train NLL ({recipe.pretrain_steps} steps)",
        [
            "train",
            str(CONFIG_DIR / "pretrain.yaml"),
            task,
            f"train.output_dir={pretrain}",
            f"train.max_steps={recipe.pretrain_steps}",
            f"data.num_samples={recipe.pretrain_steps * recipe.global_batch}",
        ],
        logs / "pretrain.log",
        demo_start,
    )
    for i, (name, loss, params) in enumerate(recipe.losses):
        _run_stage(
            f"[{i + 2}/{stages}]",
            f"fine-tune {name} ({recipe.finetune_steps} steps)",
            [
                "train",
                str(CONFIG_DIR / "finetune.yaml"),
                task,
                f"model={{name_or_path: {pretrain / 'final'}, attn_implementation: sdpa}}",
                f"loss.name={loss}",
                f"loss.params={_yaml_flow(params)}",
                f"train.output_dir={runs / name}",
                f"train.max_steps={recipe.finetune_steps}",
                f"data.num_samples={recipe.finetune_steps * recipe.global_batch}",
            ],
            logs / f"{name}.log",
            demo_start,
        )
    models = "[" + ", ".join(f"{{name: {name}, path: {runs / name / 'final'}}}" for name, *_ in recipe.losses) + "]"
    _run_stage(
        f"[{stages}/{stages}]",
        f"sweep {len(recipe.losses)} models x {len(recipe.temperatures)} temperatures",
        [
            "sweep",
            str(CONFIG_DIR / "sweep.yaml"),
            f"models={models}",
            f"output_dir={out}",
            task[5:],
            f"temperatures=[{', '.join(f'{t:g}' for t in recipe.temperatures)}]",
            f"recall_at_n={recipe.recall_at_n}",
            f"num_samples={recipe.num_samples}",
        ],
        logs / "sweep.log",
        demo_start,
    )
    plot_zoom(out / "sweep.csv", out / "pr_curve_zoom.png")
    summary = write_summary(
        out / "sweep.csv", out / "summary.md", recipe=recipe, wall_seconds=time.monotonic() - demo_start
    )
    print(
        f"demo done in {_fmt_time(time.monotonic() - demo_start)}: {out / 'pr_curve.png'}, {out / 'sweep.csv'}, "
        f"{summary}",
        flush=True,
    )
    return summary


# ---------------------------------------------------------------------------------------------
# The summary: statements computed from sweep.csv.


def read_curves(csv_path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """model -> [(T, precision, recall), ...] sorted by T, from a sweep's ``sweep.csv``."""
    curves: dict[str, list] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["model"], []).append(
                (float(row["temperature"]), float(row["precision"]), float(row["recall"]))
            )
    return {m: sorted(points) for m, points in curves.items()}


def recall_at(points: list[tuple[float, float, float]], min_precision: float) -> float:
    """Best Recall with Precision >= ``min_precision`` on the T-ordered curve (interpolated); NaN if none."""
    return recall_at_precision([p for _, p, _ in points], [r for _, _, r in points], min_precision)


def temperature_effect(points: list[tuple[float, float, float]], tol: float = TOLERANCE) -> dict:
    """What raising T above 1 does to the Recall of one model's curve."""
    by_t = {t: r for t, _, r in points}
    t_ref = min(by_t, key=lambda t: abs(t - 1.0))
    above = [(t, r) for t, r in by_t.items() if t > t_ref]
    t_best_above, r_best_above = max(above, key=lambda x: x[1]) if above else (math.nan, math.nan)
    t_max = max(by_t)
    return {
        "t_ref": t_ref,
        "recall_ref": by_t[t_ref],
        "t_max": t_max,
        "recall_t_max": by_t[t_max],
        "argmax_t": max(by_t, key=by_t.get),
        "max_recall": max(by_t.values()),
        "t_best_above": t_best_above,
        "recall_best_above": r_best_above,
        "rose": bool(above) and r_best_above > by_t[t_ref] + tol,
    }


def dominance(loss: list, reference: list, tol: float = TOLERANCE, precision_tol: float = PRECISION_TOLERANCE) -> dict:
    """Does ``loss``'s curve dominate ``reference`` + temperature?  At the Precision P_i of every
    temperature point of the reference, gap_i = (best Recall of ``loss`` at Precision >= P_i) - (best
    Recall of the reference at Precision >= P_i): the reference's upper envelope, so a point where its
    curve turns back (less Precision *and* Recall at high T) is not an easy target.  A loss that never
    reaches P_i (less ``precision_tol``) counts as Recall 0 there.  Verdict: "dominates" if no gap <
    -tol and some gap > tol, "does not dominate" if no gap > tol, "mixed" otherwise."""
    gaps = []
    for _, p, _ in reference:
        best = recall_at(loss, p - precision_tol)
        gaps.append((0.0 if math.isnan(best) else best) - recall_at(reference, p))
    above, below = sum(g > tol for g in gaps), sum(g < -tol for g in gaps)
    if above and not below:
        verdict = "dominates"
    elif not above:
        verdict = "does not dominate"
    else:
        verdict = "mixed"
    return {"verdict": verdict, "above": above, "below": below, "points": len(gaps), "gaps": gaps}


def _scale_sentence(recipe: Recipe) -> str:
    """Recall@N of the target P itself (a perfect NLL model at T=1) and of the best flattening
    P^(1/a) on the support (the sequence-level picture of what c-Div aims at): the room a loss has."""
    import numpy as np

    from recall_dist.data import build_task
    from recall_dist.eval.metrics import recall_at_n

    p = np.array(list(build_task("product", max_factor=recipe.max_factor).target_distribution("").values()))
    n = recipe.recall_at_n
    flattened = {}
    for a in np.round(np.arange(1.0, 4.01, 0.1), 1):
        q = p ** (1.0 / a)
        flattened[float(a)] = recall_at_n(np.log(q / q.sum()), p, n)
    best_a = max(flattened, key=flattened.get)
    return (
        f"For scale: a model equal to the target P has Precision 1 and Recall@{n} = {flattened[1.0]:.3f}; "
        f"the best flattening of P on its support, P^(1/a), reaches {flattened[best_a]:.3f} (a = {best_a:g}). "
        f"The room above a perfect NLL model is small here, so differences of a few thousandths matter."
    )


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def summary_markdown(
    curves: dict,
    reference: str = "nll",
    levels=PRECISION_LEVELS,
    recipe: Recipe | None = None,
    wall_seconds: float | None = None,
    tol: float = TOLERANCE,
) -> str:
    """The text of summary.md from the curves of ``read_curves``."""
    if reference not in curves:
        raise ValueError(f"the sweep has no {reference!r} model to compare with; models: {', '.join(curves)}")
    ref = curves[reference]
    eff = temperature_effect(ref, tol)
    n = recipe.recall_at_n if recipe else None
    lines = ["# recall-dist demo: NLL + temperature vs recall-oriented losses", ""]
    if recipe is not None:
        lines += [
            f"Task: products a*b of a, b ~ U{{1..{recipe.max_factor}}} (known sparse target). A tiny Llama is "
            f"pre-trained with NLL for {recipe.pretrain_steps} steps, then fine-tuned from that checkpoint "
            f"with each loss for {recipe.finetune_steps} steps (same data, seed, learning rate; 2 processes, "
            f"FSDP2 on CPU). Precision = Q_T(supp P); Recall = Recall@{n}, the expected P-mass covered by "
            f"{n} samples; both exact (enumeration of the support). Every number below is computed from "
            f"`sweep.csv` by `recall_dist/demo.py`."
            + (f" Wall time of the run: {_fmt_time(wall_seconds)}." if wall_seconds is not None else ""),
            "",
            _scale_sentence(recipe),
            "",
        ]
    lines += ["## Does raising the temperature buy NLL more Recall?", ""]
    delta = eff["recall_best_above"] - eff["recall_ref"]
    if eff["rose"]:
        lines.append(
            f"**Yes, by {delta:+.3f}**{' (slightly)' if delta < 5 * tol else ''}: "
            f"NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and "
            f"reaches {eff['recall_best_above']:.3f} at T={eff['t_best_above']:g} (best T > {eff['t_ref']:g})."
        )
    else:
        lines.append(
            f"**No**: NLL's Recall is {eff['recall_ref']:.3f} at T={eff['t_ref']:g} and no T above it "
            f"raises it by more than {tol:g} (best above: {_num(eff['recall_best_above'])} at "
            f"T={eff['t_best_above']:g})."
        )
    precision_of = {t: p for t, p, _ in ref}
    lines.append(
        f"Over the grid its Recall peaks at T={eff['argmax_t']:g} ({eff['max_recall']:.3f}); at the largest "
        f"T={eff['t_max']:g} it is {eff['recall_t_max']:.3f}, and Precision has gone from "
        f"{precision_of[eff['t_ref']]:.3f} (T={eff['t_ref']:g}) to {precision_of[eff['t_max']]:.3f}: "
        f"1 - Precision is the mass the tempered model puts on invalid outputs."
    )
    lines += [
        "",
        "## Does a recall loss dominate NLL + temperature?",
        "",
        "Recall at matched Precision: the best Recall of each model's temperature curve (interpolated "
        "between grid points) among points with Precision >= p. n/a: the curve never reaches p.",
        "",
    ]
    header = ["model"] + [f"R @ P>={p:g}" for p in levels] + ["max R (T)", "verdict vs nll"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = {}
    for model, points in curves.items():
        best = max(points, key=lambda x: x[2])
        cells = [model] + [_num(recall_at(points, p)) for p in levels] + [f"{best[2]:.3f} (T={best[0]:g})"]
        if model == reference:
            cells.append("reference")
        else:
            d = dominance(points, ref, tol)
            verdicts[model] = d
            cells.append(f"{d['verdict']} ({d['above']} above, {d['below']} below of {d['points']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Verdict: at the Precision P_i of each of NLL's {len(ref)} temperature points, the model's best "
        f"Recall at Precision >= P_i - {PRECISION_TOLERANCE:g} is compared with NLL's at Precision >= P_i "
        f"(ties within {tol:g}). *dominates*: never below and "
        f"sometimes above; *does not dominate*: never above; *mixed*: both.",
        "",
    ]
    for model, d in verdicts.items():
        diffs = [recall_at(curves[model], p) - recall_at(ref, p) for p in levels]
        shown = ", ".join(
            f"P>={p:g}: {'n/a' if math.isnan(x) else f'{x:+.3f}'}" for p, x in zip(levels, diffs, strict=False)
        )
        lines.append(f"- **{model}** vs NLL + temperature: **{d['verdict']}** (Recall minus NLL's at {shown}).")
    if "lambda_pr" in curves:
        lines += [
            "",
            "Note: token-level `lambda_pr` with a one-hot target is not strictly proper (it stops pushing "
            "a token once q >= lambda), so it is expected to lose Precision or Recall here; the demo "
            "reports what it measures (`nll_mix` restores a proper component).",
        ]
    return "\n".join(lines) + "\n"


def plot_zoom(csv_path: Path, out_path: Path, reference: str = "nll") -> Path:
    """The high-Precision corner of the sweep, where the losses differ: Recall on x (zoomed on the
    reference's range), 1 - Precision on a log y axis (inverted: up is better), points labelled by T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(csv_path)
    ref_recalls = [r for _, _, r in curves[reference]]
    top = max(r for points in curves.values() for _, _, r in points)
    lo = min(ref_recalls) - 0.25 * (top - min(ref_recalls))
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for i, (model, points) in enumerate(curves.items()):
        xs = [r for _, _, r in points]
        ys = [max(1.0 - p, 1e-7) for _, p, _ in points]
        ax.plot(xs, ys, "-o", color=f"C{i}", lw=1.8, ms=5, label=model)
        for t, p, r in points:
            if r >= lo:
                ax.annotate(
                    f"{t:g}",
                    (r, max(1.0 - p, 1e-7)),
                    textcoords="offset points",
                    xytext=(4, 3),
                    fontsize=7,
                    color=f"C{i}",
                )
    ax.set_xlim(lo, top + 0.1 * (top - lo))
    ax.set_yscale("log")
    shown = [max(1.0 - p, 1e-7) for points in curves.values() for _, p, r in points if r >= lo]
    ax.set_ylim(min(shown) / 2, max(shown) * 2)
    ax.invert_yaxis()
    ax.set_xlabel(f"Recall@{read_recall_at_n(csv_path)}")
    ax.set_ylabel("1 - Precision  (mass on invalid outputs, log scale)")
    ax.set_title("High-Precision corner of the sweep (labels: temperature T)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=130)
    plt.close(fig)
    return out_path


def read_recall_at_n(csv_path: Path) -> str:
    with open(csv_path, newline="") as f:
        return next(csv.DictReader(f)).get("recall_at_n", "N")


def write_summary(csv_path: Path, out_path: Path, **kwargs) -> Path:
    out_path.write_text(summary_markdown(read_curves(csv_path), **kwargs))
    return out_path


# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="results/demo", help="output directory (default: results/demo)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per loss (default: 500; quick: 10)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="NLL pre-training steps (default: 3000)")
    p.add_argument("--max-factor", type=int, default=None, help="A of the product task (default: 30; quick: 9)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: 2 losses, few steps, 4 temperatures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = Recipe.quick() if args.quick else Recipe()
    for key, flag, value in (
        ("finetune_steps", "--steps", args.steps),
        ("pretrain_steps", "--pretrain-steps", args.pretrain_steps),
        ("max_factor", "--max-factor", args.max_factor),
    ):
        if value is not None:
            if value < 1:
                print(f"recall-dist demo: {flag} = {value}: must be >= 1", file=sys.stderr)
                return 2
            setattr(recipe, key, value)
    try:
        run_pipeline(Path(args.out), recipe)
    except DemoError as e:
        print(f"recall-dist demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
