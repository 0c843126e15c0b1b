"""Training examples: read (prompt, completion) records from a synthetic task, a local jsonl/json/
parquet file or a Hugging Face hub dataset, and tokenize them with the loss on the completion only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recall_dist.configtree import ConfigError, check
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.synthetic import KnownSupportTask, build_task, known_tasks
from recall_dist.data.tokenizer import CharTokenizer

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_SYNTHETIC_SAMPLES = 10_000
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the training examples come from and how they are tokenized.

    source: ``"synthetic:<task>"`` (see ``known_tasks()``), a local ``.jsonl``/``.json``/``.parquet``
        file, or a Hugging Face hub dataset name (or a local dataset directory).
    task_params: parameters of the synthetic task (e.g. ``{max_factor: 30}``); empty otherwise.
    num_samples: synthetic: number of i.i.d. samples (None -> 10000); files/hub: keep the first
        ``num_samples`` rows (None -> all rows).
    prompt_field / completion_field: column names; ``prompt_field: ""`` means no prompt.
    max_length: longest tokenized sequence, bos and eos included (None: no limit).
    truncation: what to do with a longer sequence: ``right`` cuts it to ``max_length`` tokens
        (the eos is then cut too, so the model is never taught to stop where the text was cut; a
        sequence whose completion is cut entirely carries no loss and is dropped); ``drop`` drops it.
    packing: pack several examples per row in the batch iterator (rows of ``max_length`` tokens).
    seed: seed of the synthetic samples (the batch order has its own seed in the iterator).
    split: the dataset split to read.
    cache_dir: where the tokenised dataset is cached for the ranks to share (``data/cache.py``);
        None: ``$RECALL_DIST_CACHE`` or ``~/.cache/recall_dist``.
    """

    source: str = "synthetic:product"
    task_params: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    max_length: int | None = None
    truncation: Literal["right", "drop"] = "right"
    packing: bool = False
    seed: int = 0
    split: str = "train"
    cache_dir: str | None = None

    def __post_init__(self):
        check(
            isinstance(self.source, str) and self.source.strip() != "",
            "source",
            self.source,
            "a 'synthetic:<task>' name, a .jsonl/.json/.parquet path or a hub dataset name",
        )
        if self.is_synthetic:
            name = self.source[len(SYNTHETIC_PREFIX) :]
            check(
                name in known_tasks(),
                "source",
                self.source,
                f"synthetic tasks: {', '.join(SYNTHETIC_PREFIX + t for t in known_tasks())}",
            )
            try:
                build_task(name, **self.task_params)
            except (ValueError, TypeError) as e:
                raise ConfigError("task_params", f"{self.task_params!r}: {e}") from None
        else:
            check(
                not self.task_params,
                "task_params",
                self.task_params,
                "task_params only apply to 'synthetic:<task>' sources",
            )
        check(
            self.num_samples is None or self.num_samples >= 1,
            "num_samples",
            self.num_samples,
            "an integer >= 1, or null",
        )
        check(self.completion_field != "", "completion_field", self.completion_field, "a column name")
        check(
            self.max_length is None or self.max_length >= 2,
            "max_length",
            self.max_length,
            "an integer >= 2 (bos and eos included), or null",
        )
        check(self.truncation in ("right", "drop"), "truncation", self.truncation, "allowed: right, drop")
        check(
            not self.packing or self.max_length is not None,
            "packing",
            self.packing,
            "packing needs max_length (the length of a packed row)",
        )
        check(self.split != "", "split", self.split, "a split name such as 'train'")

    @property
    def is_synthetic(self) -> bool:
        return self.source.startswith(SYNTHETIC_PREFIX)

    def task(self) -> KnownSupportTask | None:
        """The synthetic task with its known target distribution, or None for file/hub data."""
        if not self.is_synthetic:
            return None
        return build_task(self.source[len(SYNTHETIC_PREFIX) :], **self.task_params)


def _open_hf_dataset(cfg: DataConfig):
    import datasets

    path = Path(cfg.source).expanduser()
    builder = _LOCAL_BUILDERS.get(path.suffix.lower())
    if (builder is not None or cfg.source.startswith((".", "/", "~"))) and not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"data.source: file not found: {path}")
    if builder is not None:
        return datasets.load_dataset(builder, data_files={cfg.split: str(path)}, split=cfg.split)
    try:
        return datasets.load_dataset(str(path) if path.exists() else cfg.source, split=cfg.split)
    except Exception as e:  # the hub client raises many types; all mean "cannot get it here"
        raise OSError(
            f"data.source = {cfg.source!r}: cannot load split {cfg.split!r} as a Hugging Face "
            f"dataset (not a local .jsonl/.json/.parquet file; offline or unknown hub name?): "
            f"{type(e).__name__}: {e}"
        ) from e


def load_records(cfg: DataConfig) -> list[dict[str, str]]:
    """The raw ``{"prompt": str, "completion": str}`` records described by ``cfg``, in source order."""
    if cfg.is_synthetic:
        return cfg.task().sample(cfg.num_samples or DEFAULT_SYNTHETIC_SAMPLES, cfg.seed)
    ds = _open_hf_dataset(cfg)
    for key, column in (("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field)):
        if column and column not in ds.column_names:
            raise ConfigError(
                f"data.{key}",
                f"{column!r} is not a column of {cfg.source!r}; available columns: {', '.join(ds.column_names)}",
            )
    if cfg.num_samples is not None:
        ds = ds.select(range(min(cfg.num_samples, len(ds))))
    prompts = ds[cfg.prompt_field] if cfg.prompt_field else [""] * len(ds)
    completions = ds[cfg.completion_field]
    records = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=False)):
        for column, value in ((cfg.prompt_field, prompt), (cfg.completion_field, completion)):
            if not isinstance(value, str):
                raise ValueError(f"{cfg.source}: row {row}, column {column!r} = {value!r}: expected a string")
        records.append({"prompt": prompt, "completion": completion})
    return records


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a ``CharTokenizer`` or a Hugging Face tokenizer."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    if text == "":
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(
    prompt: str, completion: str, tokenizer, max_length: int | None = None, truncation: str = "right"
) -> dict[str, list[int]] | None:
    """``input_ids = [bos] + prompt + completion + [eos]`` and ``labels`` aligned with it (the
    trainer shifts): the id on completion tokens and eos, -100 on bos and prompt tokens.

    bos is omitted when the tokenizer has none; eos is required.  Prompt and completion are
    tokenized separately, so the prompt/completion boundary is exact (a BPE tokenizer that wants a
    leading space on the completion must find it in the completion text).  Returns None when the
    example is dropped (see ``DataConfig.truncation``).
    """
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token: completions need an end")
    prompt_ids = ([bos] if bos is not None else []) + encode_text(tokenizer, prompt)
    completion_ids = [*encode_text(tokenizer, completion), eos]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if max_length is not None and len(input_ids) > max_length:
        if truncation == "drop":
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
    return {"input_ids": input_ids, "labels": labels}


def build_dataset(cfg: DataConfig, tokenizer) -> list[dict[str, list[int]]]:
    """Tokenized examples ``{"input_ids": list[int], "labels": list[int]}`` for ``cfg``, in source
    order (the batch iterator shuffles).  Examples dropped by truncation are counted in a warning."""
    examples, dropped = [], 0
    for record in load_records(cfg):
        example = tokenize_example(record["prompt"], record["completion"], tokenizer, cfg.max_length, cfg.truncation)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples longer than max_length=%d (truncation=%s)",
            cfg.source,
            dropped,
            dropped + len(examples),
            cfg.max_length,
            cfg.truncation,
        )
    if not examples:
        raise ValueError(
            f"data.source = {cfg.source!r}: no example left (max_length={cfg.max_length}, "
            f"truncation={cfg.truncation!r})"
        )
    return examples
