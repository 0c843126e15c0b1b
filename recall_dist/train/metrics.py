"""Training metrics: JSON lines at ``<output_dir>/metrics.jsonl`` on rank 0 (TensorBoard and W&B
optional), plus the reduction of one optimizer step's micro-batch statistics."""

from __future__ import annotations

import json
from pathlib import Path

_SUMMED = ("tokens", "nonfinite_tokens")
_MAXED = ("weight_max",)


def combine_micro_stats(micro_stats: list[dict[str, float]]) -> dict[str, float]:
    """One step's statistics from its micro-batches' (each already global over DP): counts are
    summed, maxima maxed, the rest averaged (each micro-batch is one term of the step's objective)."""
    out = {}
    for key in micro_stats[0]:
        values = [float(s[key]) for s in micro_stats if key in s]
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXED:
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


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
        if not self.enabled or not self.path.is_file():
            return
        lines = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in lines))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
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
