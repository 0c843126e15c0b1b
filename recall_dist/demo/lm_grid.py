"""``recall-dist demo-lm --grid``: the recipe grid of the known-support demo.  Which settings, if any, let
c-Div beat NLL + temperature on a real pretrained LM?

    recall-dist demo-lm --grid [--out results/demo-lm-grid] [--only NAME,NAME] [--seeds S] [--resume]

Every point fine-tunes the demo's model on the demo's data (``demo/iso.py``: the swept training prompts,
``configs/demo_lm/finetune.yaml``) and is swept exactly on those prompts (``configs/demo_lm/sweep.yaml``).
One factor at a time moves away from the centre (c-Div alpha 1.4, lr 1e-4, 56 steps of 16 examples):

- alpha in {1.1, 1.2, 1.4, 2.0};
- ``max_weight`` 2: the bounded-weight variant.  With alpha 1.4 the weight q^-0.4 is capped at 2, i.e. for
  tokens with q < 2^(-1/0.4) = 0.177.  A weighted NLL with detached weight w(q) has the gradient of
  F(q) = integral from q to 1 of w(u) / u du; with w = min(u^(1-alpha), M) that is c-Div's divergence
  for the tokens above q* = M^(1/(1-alpha)) and M (-log q) plus a constant below: c-Div where the model
  is already likely, M times NLL where it is not, so no token carries more than M times an average one;
- ``nll_mix`` 0.5;
- lr 3e-5 and 112 steps, each with NLL at the same lr and steps as its own reference;
- then the best levels combined: ``max_weight`` 2 and alpha 1.1, each at 112 steps (against NLL at 112 steps).

The machinery (per-point fine-tunes and sweeps, ``--resume``, verdicts) is ``demo/recipe_grid.py``'s.
Outputs: ``OUT/grid.csv``, ``OUT/grid.md``, one sweep per point in ``OUT/sweeps/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from recall_dist.demo.iso import IsoRecipe
from recall_dist.demo.iso_report import BANDS as SUMMARY_BANDS
from recall_dist.demo.iso_report import TIE
from recall_dist.demo.pipeline import Prepared, Setting
from recall_dist.demo.recipe_grid import GridRecipe, cdiv_point, grid_main

# demo-lm's summary bands plus one below them: at 56 steps NLL's Precision spans about 0-0.85 (docs/demo-lm/probe.md)
BANDS = ((0.25, 0.5), *SUMMARY_BANDS)

POINTS = [  # in the order they run: the settings most likely to move the verdict first
    Setting("nll", "nll"),
    cdiv_point("cdiv-1.4"),
    cdiv_point("cdiv-1.1", alpha=1.1),
    cdiv_point("cdiv-1.4-maxw2", max_weight=2.0),
    Setting("nll-112steps", "nll", steps=112),
    cdiv_point("cdiv-1.4-112steps", steps=112),
    cdiv_point("cdiv-1.2", alpha=1.2),
    cdiv_point("cdiv-1.4-mix0.5", nll_mix=0.5),
    cdiv_point("cdiv-2.0", alpha=2.0),
    Setting("nll-lr3e-05", "nll", lr=3e-5),
    cdiv_point("cdiv-1.4-lr3e-05", lr=3e-5),
    # combinations of the best levels above: the bounded weights (or alpha 1.1) that tie NLL at 56 steps, with
    # the 112 steps at which c-Div 1.4 reaches the cold end (docs/demo-lm/grid.md)
    cdiv_point("cdiv-1.4-maxw2-112steps", steps=112, max_weight=2.0),
    cdiv_point("cdiv-1.1-112steps", steps=112, alpha=1.1),
]


@dataclass(kw_only=True)
class LmGridRecipe(GridRecipe, IsoRecipe):
    """demo-lm's recipe with the grid's points as its fine-tunes, swept on the training prompts only."""

    OUT = "results/demo-lm-grid"
    POINTS: ClassVar[list[Setting]] = POINTS
    BANDS: ClassVar[tuple] = BANDS
    familiar_prompts: int = 0  # the grid sweeps the training prompts only (grid_main keeps this default)

    def tie(self) -> float:
        return TIE

    def grid_sweep_overrides(self, prepared: Prepared) -> list[str]:
        return [*prepared.sweep, f"support={self.out / 'data' / 'support_train.jsonl'}"]

    def grid_intro(self) -> str:
        return (
            f"Each fine-tunes {self.model or 'SmolLM2-135M-Instruct'} on the demo's training prompts "
            f"({self.global_batch} chat examples per step, 2 processes, FSDP2) and is swept exactly on the "
            f"{self.train_prompts} training prompts at {len(self.temperatures)} temperatures "
            f"({min(self.temperatures):g}-{max(self.temperatures):g}): Precision = Q_T(answers), Recall@100, "
            "means over the prompts (`recall_dist/demo/lm_grid.py`)."
        )


def main(argv: list[str] | None = None) -> int:
    return grid_main(LmGridRecipe, IsoRecipe, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
