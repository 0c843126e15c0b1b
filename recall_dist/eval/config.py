"""``SweepConfig``: the typed, validated config of a temperature sweep (YAML at the edge,
``key=value`` overrides; see ``configs/sweep*.yaml``).  Errors name the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recall_dist.configtree import ConfigError, check
from recall_dist.eval.pr_metrics import default_lambdas

DEFAULT_TEMPERATURES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


@dataclass
class ModelSpec:
    """One model to sweep: a Hugging Face export directory (``config.json`` + weights + tokenizer),
    or one of our raw training checkpoints (exported to HF format on first use)."""

    name: str
    path: str
    tokenizer: str | None = None  # default: the model directory itself
    # Labels for reports and figures, never parsed from the name: the fine-tuning seed this model was
    # trained with, and the family (e.g. its loss) it is one seed of (default: its own name).  Both go
    # to sweep.csv / sweep.json as columns when a model sets them; neither changes a number.
    seed: int | None = None
    family: str | None = None

    def __post_init__(self):
        check(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        check(self.seed is None or self.seed >= 0, "seed", self.seed, "an integer >= 0, or absent")
        check(self.family is None or bool(self.family), "family", self.family, "a non-empty name, or absent")
        if not Path(self.path).expanduser().exists():
            raise ConfigError("path", f"checkpoint {self.path!r} does not exist")


@dataclass
class TextSpec:
    """Open-ended text metric (``metric: text``): generations vs reference completions."""

    references: str | None = None  # jsonl with "prompt"/"completion"; default: samples of the task
    num_texts: int = 512  # equal-sized sets: one generation per reference row
    encoder: Literal["sentence-transformers", "lm"] = "sentence-transformers"
    encoder_path: str | None = None  # sentence-transformers dir; default: bundled all-MiniLM-L6-v2
    k: int = 4
    explained_variance: float = 0.9
    max_new_tokens: int | None = None  # default: the task's max_completion_chars + 1
    chunk_size: int = 64  # reference rows per work item (and per generate batch)

    def __post_init__(self):
        check(self.num_texts > self.k, "num_texts", self.num_texts, f"must be > k = {self.k}")
        check(self.k >= 1, "k", self.k, "must be >= 1")
        check(0 < self.explained_variance <= 1, "explained_variance", self.explained_variance, "must be in (0, 1]")
        check(self.chunk_size >= 1, "chunk_size", self.chunk_size, "must be >= 1")
        check(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "must be >= 1",
        )
        if self.references is not None and not Path(self.references).is_file():
            raise ConfigError("references", f"file {self.references!r} does not exist")


@dataclass
class SweepConfig:
    """Models x temperatures x prompts, evaluated by ``metric`` and written to ``output_dir``."""

    models: list[ModelSpec]
    task: str = "product"
    task_params: dict[str, Any] = field(default_factory=dict)
    # known_support on your own prompts instead of ``task``: a jsonl support file (``eval/support_file.py``)
    support: str | None = None
    normalize_p: bool = False  # support: divide each prompt's p by their sum instead of requiring 1
    metric: Literal["known_support", "text"] = "known_support"
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    num_samples: int = 200  # sampled estimates per (model, T, prompt); 0 = exact metrics only
    recall_at_n: int | None = None  # N of the exact Recall@N; default num_samples (same estimand)
    lambdas: list[float] | None = None  # PR-curve grid; default pr_metrics.default_lambdas()
    min_precision: float = 0.9  # summary: Recall at Precision >= min_precision
    output_dir: str = "runs/sweep"
    score_batch_size: int = 256  # completions per teacher-forcing forward
    generate_batch_size: int = 100  # samples per generate call (known_support: part of the seed, keep it
    # fixed; text: rows of one KV-cache decode batch, not part of any seed)
    # Compute dtype of the swept models: "auto" = the dtype they were saved in on a GPU, float32 on a
    # CPU; "bfloat16" is several times faster on CPUs with AVX512-BF16 (metrics stay fp32) and several
    # times slower on CPUs without it (emulated); "bfloat16_if_native" = bfloat16 where the device computes
    # it natively (the rule of the trainer's ``backend.bf16: auto``, train/precision.py), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "bfloat16_if_native"] = "auto"
    num_shards: int | None = None  # default: the world size of the run that computes them
    seed: int = 0
    # What identifies a model's content in the shard keys: "content" = sha256 of every file of the
    # model directory (exact; reads the weights once per process), "stat" = each file's size and
    # modification time (no read; for very large models).  See ``content_hash.py``.
    model_fingerprint: Literal["content", "stat"] = "content"
    text: TextSpec = field(default_factory=TextSpec)

    def __post_init__(self):
        check(len(self.models) > 0, "models", self.models, "list at least one {name, path}")
        names = [m.name for m in self.models]
        check(len(set(names)) == len(names), "models", names, "model names must be distinct")
        if not self.temperatures:
            raise ConfigError("temperatures", "the temperature grid is empty; give at least one T > 0")
        for i, t in enumerate(self.temperatures):
            check(t > 0, f"temperatures[{i}]", t, "temperatures must be > 0")
        check(
            len(set(self.temperatures)) == len(self.temperatures),
            "temperatures",
            self.temperatures,
            "temperatures must be distinct",
        )
        check(self.num_samples >= 0, "num_samples", self.num_samples, "must be >= 0")
        if self.recall_at_n is None:
            if self.num_samples == 0:
                raise ConfigError("recall_at_n", "required when num_samples = 0 (it defaults to num_samples)")
            self.recall_at_n = self.num_samples
        check(self.recall_at_n >= 1, "recall_at_n", self.recall_at_n, "must be >= 1")
        if self.lambdas is not None:
            check(
                len(self.lambdas) > 0 and all(lam > 0 for lam in self.lambdas),
                "lambdas",
                self.lambdas,
                "a non-empty list of numbers > 0",
            )
        check(0 <= self.min_precision <= 1, "min_precision", self.min_precision, "must be in [0, 1]")
        for key in ("score_batch_size", "generate_batch_size"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.num_shards is None or self.num_shards >= 1, "num_shards", self.num_shards, "must be >= 1")
        if self.support is not None:
            check(self.metric == "known_support", "metric", self.metric, "must be known_support with a support file")
            if not Path(self.support).expanduser().is_file():
                raise ConfigError("support", f"file {self.support!r} does not exist")
        if self.support is None:  # a built-in task is pure code; a support file is read by eval/tasks.py
            from recall_dist.data import build_task

            try:
                build_task(self.task, **self.task_params)
            except ValueError as e:
                raise ConfigError("task", str(e)) from None

    def lambda_grid(self) -> np.ndarray:
        """The PR-curve grid: ``lambdas``, or ``pr_metrics.default_lambdas()``."""
        return np.asarray(self.lambdas, dtype=np.float64) if self.lambdas is not None else default_lambdas()

    def fingerprint(self) -> dict:
        """The config part of a shard's key (the models' content is the other part, ``shards.shard_key``).

        Left out: where results go (``output_dir``), how work is cut (``num_shards``), what only the
        summary reads (``min_precision``), the models' paths (their content stands for them) and their
        ``seed`` / ``family`` labels (what reports group by; no number depends on them)."""
        data = dataclasses.asdict(self)
        for key in ("output_dir", "num_shards", "min_precision"):
            data.pop(key)
        for model in data["models"]:
            for key in ("path", "seed", "family"):  # the content stands for the path; the others are labels
                model.pop(key)
        if self.support is not None:  # the file's content, not where it lies
            data["support"] = hashlib.sha256(Path(self.support).expanduser().read_bytes()).hexdigest()
        return data
