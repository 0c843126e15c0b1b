"""Training examples: read records from a synthetic task or a user's data (``data/sources.py``: local
files and folders, ``save_to_disk`` folders, hub datasets; ``data/records.py``: chat ``messages``,
prompt/completion, text), and tokenize them with the loss on the completion / assistant turns only.
"""

from __future__ import annotations

import logging

from recall_dist.configtree import ConfigError
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.chat import tokenize_messages, truncate_example
from recall_dist.data.config import DEFAULT_SYNTHETIC_SAMPLES, DataConfig
from recall_dist.data.records import RecordError, detect_form, form_fields, to_record
from recall_dist.data.sources import open_split
from recall_dist.data.tokenizer import CharTokenizer

logger = logging.getLogger(__name__)


def load_records(cfg: DataConfig) -> list[dict]:
    """The raw records of ``cfg`` in source order (``data/records.py``): ``{"prompt", "completion"}``
    strings, or ``{"messages": [...]}`` (with ``"completion_start"`` for a conversational prompt/completion)."""
    if cfg.is_synthetic:
        return cfg.task().sample(cfg.num_samples or DEFAULT_SYNTHETIC_SAMPLES, cfg.seed)
    ds = open_split(cfg.source, cfg.split, cfg.source_key, cfg.split_key)
    form = detect_form(ds.column_names, cfg, cfg.source_key, repr(cfg.source))
    fields = form_fields(form, cfg)
    for key, column in fields:
        if column not in ds.column_names:
            raise ConfigError(
                f"data.{key}" if key else cfg.source_key,
                f"{column!r} is not a column of {cfg.source!r}; available columns: {', '.join(ds.column_names)}",
            )
    if cfg.num_samples is not None:
        ds = ds.select(range(min(cfg.num_samples, len(ds))))
    columns = {column: list(ds[column]) for _, column in fields}
    records = []
    for row in range(len(ds)):
        try:
            record = to_record({column: values[row] for column, values in columns.items()}, form, cfg)
        except RecordError as e:
            raise ConfigError(cfg.source_key, f"{cfg.source}, row {row}: {e}") from None
        if record is not None:
            records.append(record)
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
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids  # never all ignored: eos is trained
    return truncate_example(input_ids, labels, max_length, truncation)


def tokenize_record(record: dict, tokenizer, cfg: DataConfig) -> dict[str, list[int]] | None:
    """One record of ``load_records`` tokenized: a conversation through the chat template
    (``chat.tokenize_messages``), a prompt/completion pair by ``tokenize_example``."""
    if "messages" in record:
        return tokenize_messages(
            record["messages"],
            tokenizer,
            assistant_turns=cfg.assistant_turns,
            max_length=cfg.max_length,
            truncation=cfg.truncation,
            completion_start=record.get("completion_start", 0),
        )
    return tokenize_example(record["prompt"], record["completion"], tokenizer, cfg.max_length, cfg.truncation)


def build_dataset(cfg: DataConfig, tokenizer) -> list[dict[str, list[int]]]:
    """Tokenized examples ``{"input_ids": list[int], "labels": list[int]}`` for ``cfg``, in source
    order (the batch iterator shuffles).  Examples dropped by truncation are counted in a warning."""
    examples, dropped = [], 0
    for row, record in enumerate(load_records(cfg)):
        try:
            example = tokenize_record(record, tokenizer, cfg)
        except ConfigError:
            raise
        except ValueError as e:  # a conversation the template cannot place: say which one
            raise ConfigError(cfg.source_key, f"{cfg.source}, record {row}: {e}") from None
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples longer than max_length=%s (truncation=%s)",
            cfg.source,
            dropped,
            dropped + len(examples),
            cfg.max_length,
            cfg.truncation,
        )
    if not examples:
        raise ValueError(
            f"{cfg.source_key} = {cfg.source!r}: no example left (max_length={cfg.max_length}, "
            f"truncation={cfg.truncation!r})"
        )
    return examples
