"""``recall-dist demo``: the paper's claim, reproduced on CPU in minutes with the real trainer and sweep.

    recall-dist demo [--out results/demo] [--seeds S] [--grid] [--only NAME[,NAME]] [--pretrained DIR]
                     [--steps N] [--quick] [--resume]

Three stages on the demos' skeleton (``demo/pipeline.py``), each a ``torchrun --nproc-per-node 2`` subprocess
of the real CLI (logs in ``OUT/logs/``):

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
--grid --only dft,cdiv-0.5``.  ``--quick`` is the CI-sized run (tests/e2e/test_demo.py); ``--resume`` reuses
the pre-training and fine-tunes an interrupted call finished.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from recall_dist.configtree import load_yaml
from recall_dist.demo.pipeline import (
    CONFIGS,
    Prepared,
    Progress,
    Recipe,
    Result,
    Setting,
    add_common_arguments,
    recipe_from_args,
    run_command,
)

CONFIG_DIR = CONFIGS / "demo"


@dataclass(kw_only=True)
class ProductRecipe(Recipe):
    """The product demo: its sizes besides every recipe's (``demo/pipeline.py``), read from
    ``configs/demo/*.yaml`` by ``full()``; ``quick()`` is the CI-sized run.  ``model``: an NLL model (HF
    export) to fine-tune instead of pre-training one."""

    COMMAND = "demo"
    CONFIG_DIR = CONFIG_DIR
    OUT = "results/demo"
    QUICK: ClassVar[dict] = {
        "pretrain_steps": 60,
        "finetune_steps": 10,
        "max_factor": 9,
        "recall_at_n": 50,
        "num_samples": 0,
        "temperatures": [0.5, 1.0, 1.5, 2.0],
    }

    pretrain_steps: int
    max_factor: int
    recall_at_n: int
    num_samples: int
    grid: bool = False  # fine-tune ``demo/grid.py``'s settings and write the grid report instead

    @classmethod
    def configured(cls, finetune: dict, sweep: dict) -> dict:
        return {
            "pretrain_steps": load_yaml(CONFIG_DIR / "pretrain.yaml")["train"]["max_steps"],
            "max_factor": finetune["data"]["task_params"]["max_factor"],
            "recall_at_n": sweep["recall_at_n"],
            "num_samples": sweep["num_samples"],
            "data_seed": finetune["data"]["seed"],
        }

    def banner(self) -> str:
        return (
            f"recall-dist demo: {len(self.losses)} losses x {self.seeds} seed(s) on products of integers in "
            f"[1, {self.max_factor}], 2 processes; "
            + ("pre-trained model " + str(self.model) if self.model else f"pre-train {self.pretrain_steps} steps")
            + f", fine-tune {self.finetune_steps} steps each; output in {self.out}"
        )

    def prepare_stages(self) -> int:
        return 0 if self.model else 1

    def prepare(self, progress: Progress, resume: bool) -> Prepared:
        """Pre-train the tiny Llama with NLL (unless ``model`` is given); every fine-tune starts from it."""
        task = f"data.task_params={{max_factor: {self.max_factor}}}"
        model = self.model
        if model is None:
            run_dir = self.out / "runs" / "pretrain"
            progress.train(
                f"pre-train NLL ({self.pretrain_steps} steps)",
                CONFIG_DIR / "pretrain.yaml",
                [
                    task,
                    f"train.output_dir={run_dir}",
                    f"train.max_steps={self.pretrain_steps}",
                    f"data.num_samples={self.pretrain_steps * self.global_batch}",
                ],
                run_dir,
                self.pretrain_steps,
                resume,
                key="pre-train",
            )
            model = str(run_dir / "final")
        return Prepared(
            model=model,
            finetune=[f"model={{name_or_path: {model}, attn_implementation: sdpa}}", task],
            sweep=[task[5:], f"recall_at_n={self.recall_at_n}", f"num_samples={self.num_samples}"],
        )

    def report(self, result: Result) -> Path:
        from recall_dist.demo.grid import write_grid_report
        from recall_dist.demo.report import plot_zoom, write_summary

        csv_path = self.out / "sweep.csv"
        if self.grid:
            return write_grid_report(csv_path, self.out, self)
        plot_zoom(csv_path, self.out / "pr_curve_zoom.png")
        return write_summary(csv_path, self.out / "summary.md", recipe=self, wall_seconds=result.wall_seconds)


def select_models(losses: list[Setting], only: str) -> list[Setting] | str:
    """The settings of ``losses`` named in the comma-separated ``only``, in the
    order of ``losses``, and the ``nll`` reference (every report compares with it); an error message
    if no name is given or one is not among them."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [s.name for s in losses]
    unknown = [n for n in names if n not in known]
    if not names:
        return "no model named"
    if unknown:
        return f"unknown model {unknown[0]!r}; choices: {', '.join(known)}"
    return [s for s in losses if s.name == "nll" or s.name in names]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(p, ProductRecipe, "CI-sized run: 2 losses, few steps, 4 temperatures")
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
    p.add_argument("--pretrain-steps", type=int, default=None, help="NLL pre-training steps (default: configs/demo)")
    p.add_argument("--max-factor", type=int, default=None, help="A of the product task (default: configs/demo)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.grid and args.out is None:
        args.out = "results/demo-grid"
    recipe = recipe_from_args(
        ProductRecipe,
        args,
        (("pretrain_steps", "--pretrain-steps", args.pretrain_steps), ("max_factor", "--max-factor", args.max_factor)),
    )
    if isinstance(recipe, str):
        print(f"recall-dist demo: {recipe}", file=sys.stderr)
        return 2
    if args.pretrained:
        recipe.model = str(Path(args.pretrained).resolve())
        if not (Path(recipe.model) / "config.json").is_file():
            print(
                f"recall-dist demo: --pretrained {args.pretrained}: no config.json (a Hugging Face export?)",
                file=sys.stderr,
            )
            return 2
    if args.grid:
        from recall_dist.demo.grid import GRID

        recipe.grid, recipe.losses = True, list(GRID)
    if args.only is not None:
        chosen = select_models(recipe.losses, args.only)
        if isinstance(chosen, str):
            print(f"recall-dist demo: --only {args.only}: {chosen}", file=sys.stderr)
            return 2
        recipe.losses = chosen
    return run_command(recipe, args.resume)


if __name__ == "__main__":
    sys.exit(main())
