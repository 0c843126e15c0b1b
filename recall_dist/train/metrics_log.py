"""Training metrics: JSON lines at ``<output_dir>/metrics.jsonl`` on rank 0 (TensorBoard and W&B
optional).  A step's statistics come from the loss (``losses/accumulator.py``): they describe the whole step.
Also the step's throughput (``throughput``), the progress line's fields (``progress_fields``) and the
warning when the weights concentrate on a few tokens for several steps (``LowEssWarning``); README "Metrics"
lists every key."""

from __future__ import annotations

import json
import math
from pathlib import Path

from recall_dist.io import atomic_write_text
from recall_dist.log import get_logger

# What a step's loss reports; a step with a non-finite token has no meaningful value for any of them.
_LOSS_VALUES = ("loss", "nll", "divergence")
HEADER = "header"  # the key of the record that opens each start of a run (``MetricsLogger.log_header``)
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


def throughput(stats: dict[str, float], seconds: float) -> dict[str, float]:
    """A step's wall time and rates: ``trained_tokens_per_s`` counts the tokens that carry loss (``tokens``:
    labels != ignore_index, all micro-batches and ranks), ``input_tokens_per_s`` every non-padding input
    token (``input_tokens``), so a loss that trains on fewer of its input tokens shows it.
    ``tokens_per_s`` is the earlier name of ``input_tokens_per_s`` (kept as an alias)."""
    seconds = max(seconds, 1e-9)
    inputs = stats["input_tokens"] / seconds
    return {
        "step_seconds": seconds,
        "trained_tokens_per_s": stats["tokens"] / seconds,
        "input_tokens_per_s": inputs,
        "tokens_per_s": inputs,
    }


def progress_fields(stats: dict[str, float], last_eval: dict[str, str]) -> dict[str, str]:
    """The progress line: loss, learning rate, ESS / tokens, max / mean weight, the top 1%'s share of
    the objective, and the last validation loss."""
    fields = {"loss": f"{stats['loss']:.4f}", "lr": f"{stats['lr']:.2e}"}
    if "ess_fraction" in stats:
        fields["ess/tok"] = f"{stats['ess_fraction']:.3f}"
        fields["wmax/mean"] = f"{stats['weight_max_over_mean']:.3g}"
    if "top1pct_share" in stats:
        fields["top1%"] = f"{stats['top1pct_share']:.3f}"
    return fields | last_eval


class LowEssWarning:
    """Warns (``recall-dist train: WARNING: ...``) once ESS / tokens has stayed under ``threshold`` for
    ``steps`` optimizer steps in a row, and again after each further ``steps`` such steps; a step at or above
    the threshold starts the count over.  Skipped (non-finite) steps neither count nor reset it.
    ``threshold`` 0: never."""

    def __init__(self, threshold: float, steps: int, enabled: bool = True):
        self.threshold, self.steps, self.enabled = threshold, steps, enabled
        self.low = 0  # consecutive low steps
        self.log = get_logger("train")

    def update(self, step: int, stats: dict[str, float]) -> bool:
        """Count step ``step``; returns whether it warned."""
        if nonfinite_step(stats) or "ess_fraction" not in stats:
            return False
        self.low = self.low + 1 if stats["ess_fraction"] < self.threshold else 0
        if not (self.enabled and self.low and self.low % self.steps == 0):
            return False
        self.log.warning(
            "ESS / tokens has been under %g for %d steps in a row (step %d: %.4f, max/mean weight %.3g, top 1%% "
            "of tokens carry %.0f%% of the objective): the weights train on a few tokens only.  Bound them with "
            "loss.params.max_weight, mix in NLL with loss.params.nll_mix, use a rule closer to NLL (cdiv: "
            "loss.params.alpha closer to 1), or lower optim.lr; train.ess_warn_fraction sets this threshold "
            "(0: no warning).",
            self.threshold,
            self.low,
            step,
            stats["ess_fraction"],
            stats.get("weight_max_over_mean", float("nan")),
            100 * stats.get("top1pct_share", float("nan")),
        )
        return True


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
        lines = [line for line in self.path.read_text().splitlines() if line.strip() and _kept(json.loads(line), step)]
        atomic_write_text(self.path, "".join(line + "\n" for line in lines))

    def log_header(self, start_step: int, fields: dict) -> None:
        """The record that opens each start of the run, ``{"header": {"start_step": 0, **fields}}``: what
        this start ran with (the trainer's ``fields``: the kernel choice, resolved once).  ``read_metrics``
        skips it; ``read_headers`` returns it."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({HEADER: {"start_step": start_step, **fields}}) + "\n")

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


def _kept(record: dict, step: int) -> bool:
    """After a resume at ``step``: a step's record up to it, a start's header before it (an attempt that
    started at or after it is run again, and writes its own)."""
    if HEADER in record:
        return record[HEADER].get("start_step", 0) < step
    return record.get("step", 0) <= step


def _records(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The step records of ``<output_dir>/metrics.jsonl`` (for tests and the sweep; headers skipped)."""
    return [r for r in _records(output_dir) if HEADER not in r]


def read_headers(output_dir: str | Path) -> list[dict]:
    """The header of each start of the run (``MetricsLogger.log_header``), oldest first."""
    return [r[HEADER] for r in _records(output_dir) if HEADER in r]
