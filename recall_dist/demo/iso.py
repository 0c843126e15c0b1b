"""``recall-dist demo-lm``: recall losses on a real pretrained LM, measured exactly on prompts whose valid
answers are known (Debian's ``iso-codes``), on prompts the fine-tune saw and on prompts it never saw.

    recall-dist demo-lm [--out results/demo-lm] [--model DIR_OR_HUB] [--seeds S] [--steps N] [--quick]
                        [--resume]

Stages on the demos' skeleton (``demo/pipeline.py``), each a real command of this package (training and
sweep as ``torchrun --nproc-per-node 2`` subprocesses, logs in ``OUT/logs/``):

1. **Model**: SmolLM2-135M-Instruct converted once from GGUF (as ``demo-text``: ``pipeline.prepare_model``),
   or ``--model`` (any causal LM directory or hub name with a chat template).
2. **Prompts** (``demo/iso_prompts.py``): "Name a region of France. Answer with the name only." and the
   like, each with its support (8-60 answers, P uniform); a hash split holds out one prompt in five.
   ``data/train.jsonl``: ``finetune_steps x global_batch`` chat examples drawn from the *training*
   prompts only (prompt uniform, answer uniform in its support).  ``data/support_train.jsonl``: the
   supports of a fixed subset of ``train_prompts`` training prompts (the first by SHA-256 of their text,
   so the subset does not depend on file order); ``data/support_heldout.jsonl``: the held-out prompts'
   supports; ``data/support_reworded.jsonl``: the swept training prompts asked in other words, never
   trained on (``iso_prompts.REWORDINGS``: "Tell me one of the regions of France."), so the report can
   tell a change that carries over to a new wording from one that needs the model to know new answers;
   ``data/support_familiar.jsonl``: the "familiar" prompts, the ``familiar_prompts`` prompts no fine-tune
   trains on (and no other group sweeps) on which the *base* model puts the most probability on the valid
   answers (``demo/iso_familiar.py``; every candidate's score in ``data/familiar_scores.csv``): the held-out
   prompts are answered by no model, these are the unseen prompts a model does know something of;
   ``data/support.jsonl``: all four, the sweep's ``support`` file.
3. **Fine-tune** the model with each loss (``ISO_LOSSES``) on the same examples, seed, steps and
   learning rate, 2 processes on FSDP2 (``configs/demo_lm/finetune.yaml``).  The un-fine-tuned model
   adds words around a name, so the fine-tune also teaches the format.  The recipe grid's best setting
   trains twice as long (112 steps, whatever ``--steps`` says), and so does its own NLL reference.
4. **Sweep** (``configs/demo_lm/sweep.yaml``, ``metric: known_support``): exact Precision = Q_T(support)
   and Recall@N of every model and temperature on every swept prompt, by teacher forcing each answer
   through the chat template exactly as training tokenizes it (``eval/support_file.py``).
5. **Report** (``demo/iso_report.py``): ``summary.md`` (means over the training, reworded, familiar and held-out prompts
   with their spread, paired margins over NLL and verdicts per Precision band) and ``samples.md``.

Outputs in ``OUT``: ``pr_curve.png`` (all swept prompts), ``pr_curve_training.png``,
``pr_curve_reworded.png``, ``pr_curve_familiar.png``, ``pr_curve_heldout.png``, ``sweep.csv``,
``sweep_prompts.csv``, ``summary.md``, ``samples.md``.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from recall_dist.demo import iso_prompts
from recall_dist.demo.iso_familiar import familiar_prompts
from recall_dist.demo.pipeline import (
    CONFIGS,
    LOSSES,
    DemoError,
    Prepared,
    Progress,
    Recipe,
    Result,
    Setting,
    pretrained_lm_main,
    references,
)

CONFIG_DIR = CONFIGS / "demo_lm"
# The losses every demo trains, plus the best setting of demo-lm's recipe grid (docs/demo-lm/grid.md: c-Div
# alpha 1.1 for twice the demo's steps, higher than NLL trained as long in every band and seed) with NLL
# trained as long as its reference (``pipeline.references``).
ISO_LOSSES = [
    *LOSSES,
    Setting("nll-112steps", "nll", steps=112),
    Setting("cdiv-1.1-112steps", "cdiv", {"alpha": 1.1}, steps=112),
]
# Which training prompts the fine-tunes see: only the swept ones (the default: SmolLM2-135M learns their ~250
# answers in 56 steps; spread over all 142 training prompts it learns the format but not the names, docs/demo-lm/
# probe.md), or all of them.  The held-out prompts are never trained on either way.
TRAIN_ON = ("swept", "all")
# The support files of the groups the report compares, in the order it shows them: the swept training
# prompts; the same prompts in words never trained on (``iso_prompts.REWORDINGS``); the unswept
# prompts never trained on whose answers the base model knows best (``demo/iso_familiar.py``); the held-out prompts.
GROUP_FILES = {
    "training": "support_train.jsonl",
    "reworded": "support_reworded.jsonl",
    "familiar": "support_familiar.jsonl",
    "held-out": "support_heldout.jsonl",
}


def sweep_subset(prompts: list[iso_prompts.Prompt], n: int | None) -> list[iso_prompts.Prompt]:
    """The first ``n`` of ``prompts`` by the SHA-256 of their text (all when ``n`` is None): a fixed
    subset, independent of the order given, in that hash order."""
    ordered = sorted(prompts, key=lambda p: hashlib.sha256(p.text.encode()).hexdigest())
    return ordered if n is None else ordered[:n]


def swept_prompts(
    prompts: list[iso_prompts.Prompt], train_prompts: int | None, heldout_prompts: int | None
) -> tuple[list[iso_prompts.Prompt], list[iso_prompts.Prompt]]:
    """The swept training prompts and the swept held-out prompts (``sweep_subset`` of each half)."""
    training, heldout = iso_prompts.split_prompts(prompts)
    return sweep_subset(training, train_prompts), sweep_subset(heldout, heldout_prompts)


def unseen_prompts(
    prompts: list[iso_prompts.Prompt],
    train_prompts: int | None,
    heldout_prompts: int | None,
    train_on: str = "swept",
) -> list[iso_prompts.Prompt]:
    """The familiar group's candidates: the prompts no fine-tune trains on (the held-out ones, and with
    ``train_on="swept"`` the training prompts not swept) that no other group sweeps, in hash order."""
    if train_on not in TRAIN_ON:
        raise DemoError(f"data: train_on = {train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    swept_training, swept_heldout = swept_prompts(prompts, train_prompts, heldout_prompts)
    taken = {p.text for p in (*swept_training, *swept_heldout)}
    training, heldout = iso_prompts.split_prompts(prompts)
    pool = heldout if train_on == "all" else [*training, *heldout]
    return sweep_subset([p for p in pool if p.text not in taken], None)


def write_demo_data(
    out: Path,
    prompts: list[iso_prompts.Prompt],
    num_examples: int,
    train_prompts: int | None,
    heldout_prompts: int | None = None,
    seed: int = 0,
    train_on: str = "swept",
    familiar: list[iso_prompts.Prompt] | None = None,
) -> dict[str, Path]:
    """The demo's data files in ``out`` (module docstring, stage 2); returns their paths by name
    (``train``, ``support_train``, ``support_reworded``, ``support_heldout``, ``support``, and
    ``support_familiar`` when ``familiar`` is given: ``unseen_prompts`` chosen by ``demo/iso_familiar.py``).
    ``train_on``: ``"swept"`` draws the training examples from the swept training prompts only, ``"all"``
    from every training prompt."""
    if train_on not in TRAIN_ON:
        raise DemoError(f"data: train_on = {train_on!r}; expected one of {', '.join(TRAIN_ON)}")
    from recall_dist.eval.support_file import write_support_file

    swept_training, swept_heldout = swept_prompts(prompts, train_prompts, heldout_prompts)
    groups = {"support_train": swept_training, "support_heldout": swept_heldout}
    for name, chosen in groups.items():
        if not chosen:
            raise DemoError(f"data: no {name[8:]} prompt to sweep (of {len(prompts)} prompts)")
    groups["support_reworded"] = [iso_prompts.reworded(p) for p in groups["support_train"]]
    (out / "support_familiar.jsonl").unlink(missing_ok=True)  # an earlier call's group, if this one has none
    if familiar:
        unseen = {p.text for p in unseen_prompts(prompts, train_prompts, heldout_prompts, train_on)}
        clash = [p.text for p in familiar if p.text not in unseen]
        if clash:
            raise DemoError(f"data: familiar prompts must be unseen and unswept, but {clash[:3]} are trained or swept")
        groups["support_familiar"] = list(familiar)
    paths = {
        "train": iso_prompts.write_jsonl(
            out / "train.jsonl",
            iso_prompts.training_examples(
                groups["support_train"] if train_on == "swept" else prompts, num_examples, seed
            ),
        )
    }
    rows = {name: iso_prompts.support_rows(chosen) for name, chosen in groups.items()}
    for name, group_rows in rows.items():
        paths[name] = write_support_file(group_rows, out / f"{name}.jsonl")
    paths["support"] = write_support_file(
        [row for file in GROUP_FILES.values() for row in rows.get(Path(file).stem, [])],  # the report's order
        out / "support.jsonl",
    )
    return paths


@dataclass(kw_only=True)
class IsoRecipe(Recipe):
    """The known-support demo: its sizes besides every recipe's (``demo/pipeline.py``).  ``train_prompts``
    and ``heldout_prompts``: how many prompts of each group the sweep scores (None: all held-out ones);
    ``sample_prompts`` x ``samples`` answers per model and group in ``samples.md``."""

    COMMAND = "demo-lm"
    CONFIG_DIR = CONFIG_DIR
    OUT = "results/demo-lm"
    QUICK: ClassVar[dict] = {
        "finetune_steps": 2,
        "global_batch": 8,
        "temperatures": [0.5, 1.0, 1.5],
        "train_prompts": 2,
        "heldout_prompts": 2,
        "familiar_prompts": 2,
        "familiar_candidates": 4,
        "sample_prompts": 1,
        "samples": 2,
    }

    # 16 + 16 of the 142 training and 31 held-out prompts: the two means have the same noise, and the sweep
    # stays a small part of a seed (its fine-tunes are most of it: BENCHMARKS.md, "`make demo-lm` on 2 cores")
    train_prompts: int | None = 16
    heldout_prompts: int | None = 16
    # the familiar group (demo/iso_familiar.py): the 16 never-trained prompts the base model knows best, of
    # ``familiar_candidates`` candidates (None: all ~150, scored in 1-2 minutes); 0: no familiar group
    familiar_prompts: int = 16
    familiar_candidates: int | None = None
    sample_prompts: int = 2
    samples: int = 4
    train_on: str = "swept"  # TRAIN_ON
    losses: list[Setting] = field(default_factory=lambda: list(ISO_LOSSES))

    def banner(self) -> str:
        return (
            f"recall-dist demo-lm: {len(self.losses)} losses x {self.seeds} seed(s), 2 processes (FSDP2), "
            f"{self.finetune_steps} steps of {self.global_batch} chat examples each"
            + "".join(f", {s.name}: {s.steps} steps" for s in self.losses if s.steps)
            + f"; output in {self.out}"
        )

    def prepare_stages(self) -> int:
        return 2

    def prepare(self, progress: Progress, resume: bool) -> Prepared:
        """Convert (or take) the model and write the prompt files (module docstring, stages 1-2)."""
        model = self.model_stage(progress)
        label = progress.next_label()
        prompts = iso_prompts.build_prompts()
        familiar = []
        if self.familiar_prompts:
            candidates = unseen_prompts(prompts, self.train_prompts, self.heldout_prompts, self.train_on)
            familiar = familiar_prompts(
                model,
                candidates[: self.familiar_candidates],
                self.familiar_prompts,
                self.out / "data" / "familiar_scores.csv",
                label,
                reuse=resume,
            )
        paths = write_demo_data(
            self.out / "data",
            prompts,
            self.max_steps() * self.global_batch,
            self.train_prompts,
            self.heldout_prompts,
            train_on=self.train_on,
            familiar=familiar,
        )
        training, heldout = iso_prompts.split_prompts(prompts)
        print(
            f"{label} prompts: {len(training)} training and {len(heldout)} held-out; the sweep scores "
            f"{self.train_prompts or len(training)} training (and the same in other words), {len(familiar)} "
            f"familiar and {self.heldout_prompts or len(heldout)} held-out -> {self.out / 'data'}",
            flush=True,
        )
        return self.prepared(model, paths)

    def prepared(self, model: str, paths: dict[str, Path]) -> Prepared:
        """The fine-tunes' and the sweep's overrides for ``model`` and the files of ``write_demo_data``."""
        return Prepared(
            model=model,
            finetune=[
                f"model.name_or_path={model}",
                f"data.source={paths['train']}",
                f"train.global_batch_size={self.global_batch}",
                f"train.micro_batch_size={self.global_batch // 2}",
            ],
            sweep=[f"support={paths['support']}"],
        )

    def report(self, result: Result) -> Path:
        """``samples.md`` (sampled answers of each model) and ``summary.md`` from the sweep's tables."""
        from recall_dist.demo.iso_report import write_summary
        from recall_dist.demo.iso_samples import write_samples

        data = self.out / "data"
        groups = {group: data / name for group, name in GROUP_FILES.items() if (data / name).is_file()}
        models = {run.name: self.out / "runs" / run.name / "final" for run in self.runs()}
        write_samples(models, groups, self.out / "samples.md", self.temperatures, self.sample_prompts, self.samples)
        return write_summary(
            self.out,
            groups,
            recipe=self,
            references=references(self.losses),
            wall_seconds=result.wall_seconds,
            stage_seconds=result.stage_seconds,
        )


def main(argv: list[str] | None = None) -> int:
    return pretrained_lm_main(
        IsoRecipe, __doc__, "CI-sized run: 2 losses, 2 steps, 3 temperatures, 2 + 2 prompts", argv
    )


if __name__ == "__main__":
    sys.exit(main())
