"""Command-line entry point: ``recall-dist COMMAND ...`` (also ``python -m recall_dist``); COMMANDS lists them.

Each sub-command lives with its component and is imported lazily, so ``recall-dist --help`` is fast
and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("recall_dist.train.cli", "Train a causal LM with a recall loss (DeepSpeed ZeRO or FSDP2)."),
    "torchrun": ("recall_dist.torchrun", "torchrun with the run's exit code and safe signals (docs/robustness.md)."),
    "plan": ("recall_dist.train.memory_plan", "Per-GPU memory plan of a training config for N nodes x G GPUs."),
    "sweep": ("recall_dist.eval.cli", "Temperature sweep: Precision/Recall table and PR-curve plot."),
    "demo": ("recall_dist.demo.runner", "Train NLL and recall losses on a sparse task, sweep, write the PR curves."),
    "demo-text": (
        "recall_dist.demo.commands:demo_text",
        "The same on a real pretrained LM and human text (SmolLM2, fortunes); --grid: its recipe grid.",
    ),
    "demo-lm": (
        "recall_dist.demo.commands:demo_lm",
        "Exact Precision/Recall on known answers, a real LM fine-tuned (iso-codes); --grid: its recipe grid.",
    ),
    "convert-gguf": ("recall_dist.convert", "A GGUF model file into a Hugging Face safetensors directory."),
}


def _usage() -> str:
    lines = ["usage: recall-dist COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'recall-dist COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive torchrun (orphans hold GPUs)
        from recall_dist.train.preemption import die_with_parent

        die_with_parent()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"recall-dist: unknown command {name!r}; known: {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[name][0].partition(":")  # "module" (its main) or "module:function"
    return int(getattr(importlib.import_module(module), function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
