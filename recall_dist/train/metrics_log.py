"""Training metrics: JSON lines at ``<output_dir>/metrics.jsonl`` on rank 0 (TensorBoard and W&B
optional).  A step's statistics come from the loss (``losses/accumulator.py``): they describe the whole step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from recall_dist.io import atomic_write_text

# What a step's loss reports; a step with a non-finite token has no meaningful value for any of them.
_LOSS_VALUES = ("loss", "nll", "divergence")
EVAL_PREFIX = "eval_"  # the validation set's values in a step's record: eval_loss, eval_nll, eval_tokens


def nonfinite_step(stats: dict[str, float]) -> bool:
    """Whether a step's loss or gradient norm was non-finite (the engine skipped its update)."""
    norm = stats.get("grad_norm")
    return (
        stats.get("nonfinite_tokens", 0.0) > 0
        or not math.isfinite(stats.get("loss", 0.0))
        or (norm is not None and not math.isfinite(norm))
    )


def mark_nonfinite(stats: dict[str, float]) -> dict[str, float]:
    """Report a step with non-finite tokens as NaN loss, never as the 0.0 the skipped update used
    (``json`` writes NaN/Infinity, which Python's ``json`` and pandas read back)."""
    if stats.get("nonfinite_tokens", 0.0) > 0:
        for key in _LOSS_VALUES:
            if key in stats:
                stats[key] = float("nan")
    return stats


def _tensorboard_tag(key: str) -> str:
    """``eval_loss`` -> ``eval/loss`` (the validation set's values), anything else -> ``train/<key>``."""
    return f"eval/{key[len(EVAL_PREFIX) :]}" if key.startswith(EVAL_PREFIX) else f"train/{key}"


class MetricsLogger:
    """Appends one JSON object per logged step; on resume drops lines past the resumed step so
    the file reads as one uninterrupted run."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool = False,
        wandb: bool = False,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(config=run_config or {}, dir=str(output_dir))

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (the resumed run logs them again); the file is
        replaced atomically, so a kill during the rewrite leaves the old one."""
        if not self.enabled or not self.path.is_file():
            return
        lines = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(_tensorboard_tag(key), value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``<output_dir>/metrics.jsonl`` (for tests and the sweep)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
