"""``recall-dist demo``: the paper's claim, reproduced on CPU in minutes with the real trainer and sweep.

    recall-dist demo [--out results/demo] [--seeds S] [--grid] [--only NAME[,NAME]] [--pretrained DIR]
                     [--steps N] [--quick]

Three stages, each a ``torchrun --nproc-per-node 2`` subprocess of the real CLI (logs in ``OUT/logs/``):

1. **Pre-train** a tiny Llama (``configs/demo/tiny-llama-h64.yaml``) with NLL from scratch on the
   built-in ``product`` task (a, b ~ U{1..A}, completion str(a*b); A = 30 gives 308 valid products).
   ``--pretrained DIR`` uses an existing export instead (e.g. ``results/demo/runs/pretrain/final``).
2. **Fine-tune** that model with each loss -- ``nll``, ``cdiv`` (alpha 1.4 and 2.0), ``truncr``,
   ``lambda_pr`` at their default settings -- with the same data, seed, steps and learning rate
   (``configs/demo/finetune.yaml``).  This is the paper's setting (fine-tuning pretrained models),
   and it makes the comparison fair: every model starts from the same point and differs only by its
   loss.  ``--seeds S`` repeats every fine-tune with S seeds (seed k: ``train.seed`` + k, the batch
   order, and ``data.seed`` + k, fresh samples) and reports mean and min-max over them.
3. **Sweep** the temperature grid with 2 processes (``configs/demo/sweep.yaml``): exact Precision =
   Q_T(supp P) and Recall@N = sum_x P(x)(1 - (1 - Q_T(x))^N), N = 500 > the 308 products, so Recall
   measures coverage of the support, the regime where a flatter model *on* the support pays off.

The sizes (steps, A, batch, temperatures, N) are read from those three configs, which ship inside the
package (``recall_dist/demo/configs/demo/``): the configs are the one place they are written.  Outputs in
``OUT``: ``pr_curve.png`` (the sweep's figure), ``pr_curve_zoom.png`` (the high-Precision corner),
``sweep.csv``, ``sweep.json`` and ``summary.md``, computed from ``sweep.csv`` by ``demo/report.py``.
``--grid`` fine-tunes the TruncR / lambda-PR grid of ``demo/grid.py`` (and its Precision-side family)
instead and writes ``grid.md`` and ``grid.csv``, plus ``precision_rules.md`` / ``.csv`` (default output
``results/demo-grid``).  ``--only NAME[,NAME]`` trains and sweeps only those models of the demo (or,
with ``--grid``, of the grid), with the ``nll`` reference always included: e.g. ``recall-dist demo
--grid --only dft,cdiv-0.5``.  ``--quick`` is the CI-sized run (tests/e2e/test_demo.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recall_dist.configtree import load_yaml
from recall_dist.demo.report import fmt_time, plot_zoom, write_summary

# The directory that holds the recall_dist package (the source checkout, or site-packages when installed):
# the stages' subprocesses run there and import this same package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# The demos' configs ship inside the package (package data), so an installed ``recall-dist demo`` finds them.
CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = CONFIGS / "demo"

# (model name, loss name, loss params): the models the demo trains, NLL first (the reference).
# TruncR and lambda-PR run at their defaults, the best settings of the demo's grid (README).
LOSSES = [
    ("nll", "nll", {}),
    ("cdiv-1.4", "cdiv", {"alpha": 1.4}),
    ("cdiv-2.0", "cdiv", {"alpha": 2.0}),
    ("truncr", "truncr", {}),
    ("lambda_pr", "lambda_pr", {"nll_mix": 0.5}),  # nll_mix is a shared option: not part of the rule's defaults
]


@dataclass
class Recipe:
    """Sizes of one demo run: ``Recipe.full()`` reads them from ``CONFIG_DIR`` (``configs/demo/*.yaml``);
    ``Recipe.quick()`` is the CI-sized run."""

    pretrain_steps: int
    finetune_steps: int
    max_factor: int
    recall_at_n: int
    num_samples: int
    temperatures: list[float]
    global_batch: int
    train_seed: int = 0
    data_seed: int = 1
    losses: list[tuple] = field(default_factory=lambda: list(LOSSES))
    seeds: int = 1

    @classmethod
    def full(cls) -> Recipe:
        pretrain, finetune = load_yaml(CONFIG_DIR / "pretrain.yaml"), load_yaml(CONFIG_DIR / "finetune.yaml")
        sweep = load_yaml(CONFIG_DIR / "sweep.yaml")
        return cls(
            pretrain_steps=pretrain["train"]["max_steps"],
            finetune_steps=finetune["train"]["max_steps"],
            max_factor=finetune["data"]["task_params"]["max_factor"],
            recall_at_n=sweep["recall_at_n"],
            num_samples=sweep["num_samples"],
            temperatures=list(sweep["temperatures"]),
            global_batch=finetune["train"]["global_batch_size"],
            train_seed=finetune["train"]["seed"],
            data_seed=finetune["data"]["seed"],
        )

    @classmethod
    def quick(cls) -> Recipe:
        full = cls.full()
        return cls(
            pretrain_steps=60,
            finetune_steps=10,
            max_factor=9,
            recall_at_n=50,
            num_samples=0,
            temperatures=[0.5, 1.0, 1.5, 2.0],
            global_batch=full.global_batch,
            train_seed=full.train_seed,
            data_seed=full.data_seed,
            losses=[LOSSES[0], LOSSES[1]],
        )

    def runs(self) -> list[tuple[str, str, dict, int]]:
        return seed_runs(self.losses, self.seeds)


def seed_runs(losses: list[tuple], seeds: int) -> list[tuple[str, str, dict, int]]:
    """(model name, loss, params, seed index) of every fine-tune of ``losses`` x ``seeds``; names get
    ``-s<k>`` with several seeds (what ``report.split_seeds`` reads back)."""
    return [
        (name if seeds == 1 else f"{name}-s{seed}", loss, params, seed)
        for seed in range(seeds)
        for name, loss, params in losses
    ]


class DemoError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Running the stages: torchrun subprocesses of the real CLI, with a progress line per stage.


def torchrun(*target: str) -> list[str]:
    """The command that runs ``target`` (``-m module ...`` or ``script.py ...``) in 2 local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target]


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
    cmd = torchrun("-m", "recall_dist", *args)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])),
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    start, last_print, tty = time.monotonic(), 0.0, sys.stdout.isatty()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=PACKAGE_PARENT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                now = time.monotonic()
                if tty or now - last_print >= 15:
                    step = _tqdm_progress(log)
                    line = (
                        f"{label} {what}: {step or 'starting'}  ({fmt_time(now - start)}, "
                        f"demo {fmt_time(now - demo_start)})"
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


def _run_stage(
    label: str, what: str, args: list[str], log: Path, demo_start: float, run_dir: Path | None = None, attempts: int = 2
) -> float:
    """``_run_once``, retried once: a worker of the CPU gloo runs occasionally aborts in teardown
    after finishing (exit -6, "terminate called without an active exception"), so one retry, announced
    on the console, keeps the demo from dying of that.  For a training stage (``run_dir``), a run whose
    export ``final/`` was written before the abort counts as done, and a retry starts from an empty
    ``run_dir`` (the trainer refuses to start over in a used one).  A stage that fails twice raises
    ``DemoError`` naming it and its log.  Returns the seconds of the successful attempt."""
    import shutil

    for attempt in range(1, attempts + 1):
        code, seconds = _run_once(label, what, args, log, demo_start)
        finished = run_dir is not None and (run_dir / "final" / "config.json").is_file()
        if code == 0 or finished:
            note = "" if code == 0 else f" (exit code {code} after the export; the model is complete)"
            print(
                f"{label} {what}: done in {fmt_time(seconds)}{note}  (demo {fmt_time(time.monotonic() - demo_start)})",
                flush=True,
            )
            return seconds
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        if attempt < attempts:
            kept = log.with_suffix(f".attempt{attempt}.log")
            log.replace(kept)
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"{label} {what}: FAILED (exit code {code}, log {kept}); retrying once", flush=True)
    raise DemoError(
        f"{what} failed (exit code {code}, {attempts} attempts); full log: {log}\n--- last lines ---\n{tail}"
    )


def _yaml_flow(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


def _pretrain(out: Path, recipe: Recipe, task: str, label: str, demo_start: float) -> Path:
    pretrain = out / "runs" / "pretrain"
    _run_stage(
        label,
        f"pre-train NLL ({recipe.pretrain_steps} steps)",
        [
            "train",
            str(CONFIG_DIR / "pretrain.yaml"),
            task,
            f"train.output_dir={pretrain}",
            f"train.max_steps={recipe.pretrain_steps}",
            f"data.num_samples={recipe.pretrain_steps * recipe.global_batch}",
        ],
        out / "logs" / "pretrain.log",
        demo_start,
        run_dir=pretrain,
    )
    return pretrain / "final"


def _finetune(out: Path, recipe: Recipe, task: str, pretrained: Path, labels, demo_start: float) -> list[str]:
    names = []
    for label, (name, loss, params, seed) in zip(labels, recipe.runs(), strict=True):
        _run_stage(
            label,
            f"fine-tune {name} ({recipe.finetune_steps} steps)",
            [
                "train",
                str(CONFIG_DIR / "finetune.yaml"),
                task,
                f"model={{name_or_path: {pretrained}, attn_implementation: sdpa}}",
                f"loss.name={loss}",
                f"loss.params={_yaml_flow(params)}",
                f"train.output_dir={out / 'runs' / name}",
                f"train.max_steps={recipe.finetune_steps}",
                f"data.num_samples={recipe.finetune_steps * recipe.global_batch}",
                f"train.seed={recipe.train_seed + seed}",
                f"data.seed={recipe.data_seed + seed}",
            ],
            out / "logs" / f"{name}.log",
            demo_start,
            run_dir=out / "runs" / name,
        )
        names.append(name)
    return names


def run_pipeline(out: Path, recipe: Recipe, pretrained: Path | None = None, grid: bool = False) -> Path:
    """Train every model of ``recipe``, sweep them, write the outputs in ``out``; return the report's path."""
    import shutil

    from recall_dist.demo.grid import write_grid_report

    demo_start = time.monotonic()
    task = f"data.task_params={{max_factor: {recipe.max_factor}}}"
    runs = recipe.runs()
    # Every model is trained afresh into an empty directory (a run's directory belongs to that run).
    # The sweep's shards are keyed by the models' content, so old shards are not reused for them.
    for name in [name for name, *_ in runs] + (["pretrain"] if pretrained is None else []):
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
    stages = len(runs) + 1 + (pretrained is None)
    labels = iter(f"[{k}/{stages}]" for k in range(1, stages + 1))
    print(
        f"recall-dist demo: {len(recipe.losses)} losses x {recipe.seeds} seed(s) on products of integers in "
        f"[1, {recipe.max_factor}], 2 processes; "
        + ("pre-trained model " + str(pretrained) if pretrained else f"pre-train {recipe.pretrain_steps} steps")
        + f", fine-tune {recipe.finetune_steps} steps each; output in {out}",
        flush=True,
    )
    if pretrained is None:
        pretrained = _pretrain(out, recipe, task, next(labels), demo_start)
    names = _finetune(out, recipe, task, pretrained, [next(labels) for _ in runs], demo_start)
    models = "[" + ", ".join(f"{{name: {name}, path: {out / 'runs' / name / 'final'}}}" for name in names) + "]"
    _run_stage(
        next(labels),
        f"sweep {len(names)} models x {len(recipe.temperatures)} temperatures",
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
        out / "logs" / "sweep.log",
        demo_start,
    )
    wall = time.monotonic() - demo_start
    if grid:
        report = write_grid_report(out / "sweep.csv", out, recipe)
    else:
        plot_zoom(out / "sweep.csv", out / "pr_curve_zoom.png")
        report = write_summary(out / "sweep.csv", out / "summary.md", recipe=recipe, wall_seconds=wall)
    print(f"demo done in {fmt_time(wall)}: {report}", flush=True)
    return report


def select_models(losses: list[tuple], only: str) -> list[tuple] | str:
    """The (name, loss, params) entries of ``losses`` named in the comma-separated ``only``, in the
    order of ``losses``, and the ``nll`` reference (every report compares with it); an error message
    if no name is given or one is not among them."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [name for name, *_ in losses]
    unknown = [n for n in names if n not in known]
    if not names:
        return "no model named"
    if unknown:
        return f"unknown model {unknown[0]!r}; choices: {', '.join(known)}"
    return [entry for entry in losses if entry[0] == "nll" or entry[0] in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=None, help="output directory (default: results/demo, grid: results/demo-grid)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per loss (default: 1)")
    p.add_argument(
        "--grid", action="store_true", help="fine-tune the TruncR / lambda-PR grid instead of the demo's losses"
    )
    p.add_argument(
        "--only",
        default=None,
        metavar="NAME[,NAME]",
        help="train and sweep only these models (of the demo, or of the grid with --grid); nll is always included",
    )
    p.add_argument("--pretrained", default=None, help="use this NLL model (HF export) instead of pre-training")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per loss (default: configs/demo)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="NLL pre-training steps (default: configs/demo)")
    p.add_argument("--max-factor", type=int, default=None, help="A of the product task (default: configs/demo)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: 2 losses, few steps, 4 temperatures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = Recipe.quick() if args.quick else Recipe.full()
    for key, flag, value in (
        ("finetune_steps", "--steps", args.steps),
        ("pretrain_steps", "--pretrain-steps", args.pretrain_steps),
        ("max_factor", "--max-factor", args.max_factor),
        ("seeds", "--seeds", args.seeds),
    ):
        if value is not None:
            if value < 1:
                print(f"recall-dist demo: {flag} = {value}: must be >= 1", file=sys.stderr)
                return 2
            setattr(recipe, key, value)
    pretrained = Path(args.pretrained).resolve() if args.pretrained else None
    if pretrained is not None and not (pretrained / "config.json").is_file():
        print(
            f"recall-dist demo: --pretrained {args.pretrained}: no config.json (a Hugging Face export?)",
            file=sys.stderr,
        )
        return 2
    if args.grid:
        from recall_dist.demo.grid import GRID

        recipe.losses = list(GRID)
    if args.only is not None:
        chosen = select_models(recipe.losses, args.only)
        if isinstance(chosen, str):
            print(f"recall-dist demo: --only {args.only}: {chosen}", file=sys.stderr)
            return 2
        recipe.losses = chosen
    out = Path(args.out or ("results/demo-grid" if args.grid else "results/demo")).resolve()
    try:
        run_pipeline(out, recipe, pretrained, grid=args.grid)
    except DemoError as e:
        print(f"recall-dist demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
