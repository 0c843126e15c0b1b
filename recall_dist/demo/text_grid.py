"""``recall-dist demo-text --grid``: the recipe grid of the fortunes demo.  Which settings, if any, let c-Div
beat NLL + temperature on real human-written text?

    recall-dist demo-text --grid [--out results/demo-text-grid] [--only NAME,NAME] [--seeds S] [--resume]

Every point fine-tunes the demo's model on the demo's corpus (``demo/fortunes.py``,
``configs/demo_text/finetune.yaml``) and is swept as the demo sweeps (``configs/demo_text/sweep.yaml``:
k-NN Precision / Recall of one generation per held-out fortune).  One factor at a time moves away from the
centre (c-Div alpha 1.4, lr 2e-5, 30 steps of 32 examples):

- alpha in {1.1, 1.2, 1.4, 2.0};
- ``max_weight`` 2 (the bounded-weight variant: its derivation is in ``demo/lm_grid.py``);
- ``nll_mix`` 0.5;
- lr 6e-6 and 2e-6, and 60 steps, each with NLL at the same lr and steps as its own reference;
- alpha 1.1 at 60 steps: the analogue of the demo-lm grid's finalist (alpha 1.1 at twice the default steps).

Ties: margins within 0.5 / sqrt(num_texts) (0.029 for 300 texts, the demo's tolerance:
``demo/fortunes_report.tie_tolerance``).  The machinery is ``demo/recipe_grid.py``'s.  Outputs:
``OUT/grid.csv``, ``OUT/grid.md``, one sweep per point in ``OUT/sweeps/``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

from recall_dist.demo.fortunes import FortunesRecipe
from recall_dist.demo.fortunes_report import tie_tolerance
from recall_dist.demo.pipeline import Setting
from recall_dist.demo.recipe_grid import GridRecipe, cdiv_point, grid_main

# k-NN Precision of the demo's NLL runs spans 0.76-0.96 over T 0.6-1.6 (docs/demo-text/sweep.csv)
BANDS = ((0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.0))

POINTS = [  # in the order they run
    Setting("nll", "nll"),
    cdiv_point("cdiv-1.4"),
    cdiv_point("cdiv-1.1", alpha=1.1),
    cdiv_point("cdiv-1.4-maxw2", max_weight=2.0),
    cdiv_point("cdiv-1.2", alpha=1.2),
    cdiv_point("cdiv-1.4-mix0.5", nll_mix=0.5),
    cdiv_point("cdiv-2.0", alpha=2.0),
    Setting("nll-lr6e-06", "nll", lr=6e-6),
    cdiv_point("cdiv-1.4-lr6e-06", lr=6e-6),
    Setting("nll-lr2e-06", "nll", lr=2e-6),
    cdiv_point("cdiv-1.4-lr2e-06", lr=2e-6),
    Setting("nll-60steps", "nll", steps=60),
    cdiv_point("cdiv-1.4-60steps", steps=60),
    cdiv_point("cdiv-1.1-60steps", steps=60, alpha=1.1),  # demo-lm's finalist (alpha 1.1, twice the steps)
]


@dataclass(kw_only=True)
class TextGridRecipe(GridRecipe, FortunesRecipe):
    """demo-text's recipe with the grid's points as its fine-tunes."""

    OUT = "results/demo-text-grid"
    POINTS: ClassVar[list[Setting]] = POINTS
    BANDS: ClassVar[tuple] = BANDS

    def tie(self) -> float:
        return tie_tolerance(self.num_texts)

    def grid_intro(self) -> str:
        return (
            f"Each fine-tunes {self.model or 'SmolLM2-135M-Instruct'} on the fortunes corpus ({self.global_batch} "
            f"chat examples per step, 2 processes, FSDP2) and is swept on {self.num_texts} held-out fortunes at "
            f"{len(self.temperatures)} temperatures ({min(self.temperatures):g}-{max(self.temperatures):g}): one "
            "generation per reference, k-NN Precision / Recall (k = 4) of their all-MiniLM-L6-v2 embeddings "
            "(`recall_dist/demo/text_grid.py`)."
        )


def main(argv: list[str] | None = None) -> int:
    return grid_main(TextGridRecipe, FortunesRecipe, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
