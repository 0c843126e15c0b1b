"""The data section of a training config: ``DataConfig``, where the examples come from and how they are
tokenized, validated when built (no file is read here: ``data/validation.py`` and the resource checks
of ``train/resources.py`` look at the sources).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from recall_dist.configtree import ConfigError, check
from recall_dist.data.chat import ASSISTANT_TURNS
from recall_dist.data.sources import SINGLE_SPLIT, parse_split
from recall_dist.data.synthetic import KnownSupportTask, build_task, known_tasks

SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_SYNTHETIC_SAMPLES = 10_000
SOURCES = (
    "a 'synthetic:<task>' name, a .jsonl/.json/.parquet/.csv/.txt file or folder, a save_to_disk folder, "
    "or a hub dataset name"
)


@dataclass
class DataConfig:
    """Where the training (and validation) examples come from and how they are tokenized.

    source: ``"synthetic:<task>"`` (see ``known_tasks()``), a local ``.jsonl``/``.json``/``.parquet``/
        ``.csv``/``.txt`` file, a folder of such files, a ``datasets.save_to_disk`` folder, or a Hugging
        Face hub dataset name (``data/sources.py``).
    task_params: parameters of the synthetic task (e.g. ``{max_factor: 30}``); empty otherwise.
    num_samples: synthetic: number of i.i.d. samples (None -> 10000); files/hub: keep the first
        ``num_samples`` rows of the training split (None -> all rows).
    prompt_field / completion_field: column names; ``prompt_field: ""`` or null means no prompt.  Both may
        hold message lists (TRL's conversational prompt/completion: the completion's assistant turns train).
    messages_field: the column of chat conversations (lists of ``{role, content}``), used when present.
    assistant_turns: which assistant turns of a conversation carry the loss: ``all`` or ``last``.
    chat_template: a Jinja chat template string, or a ``.jinja`` file, replacing the tokenizer's own.
    max_length: longest tokenized sequence, bos and eos included (None: no limit).
    truncation: what to do with a longer sequence: ``right`` cuts it to ``max_length`` tokens
        (the eos is then cut too, so the model is never taught to stop where the text was cut; a
        sequence whose completion is cut entirely carries no loss and is dropped); ``drop`` drops it.
    packing: pack several examples per row in the batch iterator (rows of ``max_length`` tokens).
    seed: seed of the synthetic samples (the batch order has its own seed in the iterator).
    split: the split to train on, optionally sliced: ``train``, ``train[:90%]``, ``train[:1000]``.
    eval_source / eval_split: the validation set (``train.eval_every``): ``eval_split`` of ``eval_source``
        (default: of ``source``; with ``eval_source`` the split defaults to ``train``, all of a file).
        Every row is used (``num_samples`` applies to training only).
    cache_dir: where the tokenised dataset is cached for the ranks to share (``data/cache.py``);
        None: ``$RECALL_DIST_CACHE`` or ``~/.cache/recall_dist``.
    """

    source: str = "synthetic:product"
    task_params: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None
    prompt_field: str | None = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    assistant_turns: Literal["all", "last"] = "all"
    chat_template: str | None = None
    max_length: int | None = None
    truncation: Literal["right", "drop"] = "right"
    packing: bool = False
    seed: int = 0
    split: str = "train"
    eval_source: str | None = None
    eval_split: str | None = None
    cache_dir: str | None = None

    # The config keys that name this config's source and split in errors (a validation set's differ).
    source_key: ClassVar[str] = "data.source"
    split_key: ClassVar[str] = "data.split"

    def __post_init__(self):
        check(isinstance(self.source, str) and self.source.strip() != "", "source", self.source, SOURCES)
        if self.prompt_field is None:  # null and "" both mean "no prompt"
            self.prompt_field = ""
        if self.is_synthetic:
            self._check_synthetic()
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
        check(self.messages_field != "", "messages_field", self.messages_field, "a column name")
        check(self.assistant_turns in ASSISTANT_TURNS, "assistant_turns", self.assistant_turns, "allowed: all, last")
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
        parse_split(self.split, "split")
        self._check_eval_set()

    def _check_synthetic(self) -> None:
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

    def _check_eval_set(self) -> None:
        if self.eval_split is not None:
            parse_split(self.eval_split, "eval_split")
        if self.eval_source is not None:
            check(self.eval_source.strip() != "", "eval_source", self.eval_source, f"null, or {SOURCES}")
            check(
                not self.eval_source.startswith(SYNTHETIC_PREFIX),
                "eval_source",
                self.eval_source,
                "a file, folder or hub dataset (a synthetic task is scored exactly by the temperature sweep)",
            )
        elif self.eval_split is not None:
            check(
                not self.is_synthetic,
                "eval_split",
                self.eval_split,
                "null: a synthetic task has no splits (give data.eval_source, a file or hub dataset)",
            )

    @property
    def is_synthetic(self) -> bool:
        return self.source.startswith(SYNTHETIC_PREFIX)

    @property
    def has_eval_set(self) -> bool:
        return self.eval_source is not None or self.eval_split is not None

    def task(self) -> KnownSupportTask | None:
        """The synthetic task with its known target distribution, or None for file/hub data."""
        if not self.is_synthetic:
            return None
        return build_task(self.source[len(SYNTHETIC_PREFIX) :], **self.task_params)

    def eval_config(self) -> DataConfig | None:
        """The validation set as a config of its own (every row, no packing; errors name the
        ``data.eval_*`` keys), or None when there is none."""
        if not self.has_eval_set:
            return None
        config = dataclasses.replace(
            self,
            source=self.eval_source or self.source,
            split=self.eval_split or (SINGLE_SPLIT if self.eval_source else self.split),
            num_samples=None,
            packing=False,
            eval_source=None,
            eval_split=None,
        )
        config.source_key = "data.eval_source" if self.eval_source is not None else "data.source"
        config.split_key = "data.eval_split"
        return config
