"""Check a user's data before training starts: every local source (a file, a folder of files, a
``save_to_disk`` folder; the training set and the validation set) readable, its split present, each row
of the form its columns announce (``data/records.py``: chat messages with an assistant turn,
prompt/completion strings or message lists, text), at least one row, and a chat template for chat data.

An error is one line naming the file, the line (or row) and what was expected, raised as a
``DataError`` (a ``ConfigError`` of the ``data.*`` key at fault).  The trainer runs this before any
process group exists, and ``recall-dist train`` turns it into exit code 2 like a config error.  Hub
datasets are checked when they are loaded (their rows are not here yet).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from recall_dist.configtree import ConfigError
from recall_dist.data.chat import require_chat_template
from recall_dist.data.config import DataConfig
from recall_dist.data.records import RecordError, describe, detect_form, form_fields, to_record
from recall_dist.data.sources import check_split, csv_header, folder_splits, local_path, parse_split, saved_kind

Rows = Iterator[tuple[str, object]]  # (where, row) pairs: a row is a dict when it is well formed


class DataError(ConfigError):
    """A data source's content is not what ``DataConfig`` describes (``key``: the config key at fault)."""

    def __init__(self, message: str, key: str = "data.source"):
        super().__init__(key, message)


def _json_lines(path: Path, key: str) -> Rows:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})", key) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}, column {e.colno}: not valid JSON ({e.msg}); expected one object per line: "
                    f"{line.strip()[:80]!r}",
                    key,
                ) from None


def _json(path: Path, key: str) -> Rows:
    """A ``.json`` file: a JSON array of records, or JSON lines (what ``datasets`` reads from it)."""
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        yield from _json_lines(path, key)  # not one document: JSON lines, reported per line
        return
    if isinstance(document, dict):  # a single record on one line is JSON lines of length 1
        yield f"{path}, line 1", document
    elif isinstance(document, list):
        for i, record in enumerate(document):
            yield f"{path}, record {i}", record
    else:
        kind = type(document).__name__
        raise DataError(f"{path}: expected a JSON array of records or one record per line, got a {kind}", key)


def _csv(path: Path, key: str) -> Rows:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}, line {reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", key) from None
    except csv.Error as e:
        raise DataError(f"{path}: not readable as CSV ({e})", key) from None


def _text(path: Path, key: str) -> Rows:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield f"{path}, line {lineno}", {"text": raw.decode("utf-8").rstrip("\r\n")}
            except UnicodeDecodeError as e:
                where = f"{path}, line {lineno}"
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})", key) from None


def _table_rows(label: str, batches) -> Rows:
    """Rows of Arrow record batches (Parquet, or a saved dataset's table)."""
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{label}, row {i}", row
            i += 1


def _parquet(path: Path, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})", key) from None
    return file.schema_arrow, _table_rows(str(path), file.iter_batches(batch_size=1024))


def _check_schema(label: str, schema, form: str, cfg: DataConfig, key: str) -> None:
    """Columns of a typed table: present, strings for text fields, lists for message fields."""
    import pyarrow as pa

    for key, field in form_fields(form, cfg):
        if field not in schema.names:
            where = f" (data.{key})" if key else ""
            columns = ", ".join(schema.names) or "none"
            raise DataError(f"{label}: no column {field!r}{where}; columns: {columns}", key)
        kind = schema.field(field).type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if form == "messages" and not is_list:
            raise DataError(
                f"{label}: column {field!r} has type {kind}; expected lists of {{role, content}} messages", key
            )
        if form != "messages" and not (is_text or (form == "prompt_completion" and is_list)):
            raise DataError(f"{label}: column {field!r} has type {kind}; expected strings (or lists of messages)", key)


def _form_of(columns, cfg: DataConfig, where: str, key: str) -> str:
    """``records.detect_form`` with its error as a ``DataError`` (the data is at fault, not a key's value)."""
    try:
        return detect_form(columns, cfg, key, where)
    except ConfigError as e:
        raise DataError(e.message, e.key) from None


def _check_rows(rows: Rows, cfg: DataConfig, form: str | None, key: str) -> tuple[int, bool]:
    """Check every row against ``form`` (None: the first row decides); (records kept, any conversation)."""
    count, chat = 0, False
    for where, row in rows:
        if not isinstance(row, dict):
            kind = f"a JSON {type(row).__name__}" if not isinstance(row, str) else "a string"
            expected = describe(form or "prompt_completion", cfg)
            raise DataError(f"{where}: expected {expected}, got {kind}: {row!r:.80}", key)
        form = form or _form_of(row, cfg, where, key)
        try:
            record = to_record(row, form, cfg)
        except RecordError as e:
            has = f"; expected {describe(form, cfg)}; this record has: {', '.join(map(repr, row)) or 'no fields'}"
            raise DataError(f"{where}: {e}{has if str(e).startswith('no ') else ''}", key) from None
        count += record is not None
        chat = chat or (record is not None and "messages" in record)
    return count, chat


def _file_rows(path: Path, key: str) -> tuple[object, Rows]:
    """(Arrow schema or None, rows) of one data file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet(path, key)
    readers = {".jsonl": _json_lines, ".json": _json, ".csv": _csv, ".txt": _text}
    return None, readers[suffix](path, key)


def _check_files(files: list[Path], cfg: DataConfig, key: str) -> tuple[int, bool]:
    count, chat, form = 0, False, None
    for path in files:
        schema, rows = _file_rows(path, key)
        if schema is not None:
            form = form or _form_of(schema.names, cfg, str(path), key)
            _check_schema(str(path), schema, form, cfg, key)
        if path.suffix.lower() == ".csv":
            form = form or _form_of(csv_header(path), cfg, str(path), key)
        n, c = _check_rows(rows, cfg, form, key)
        count, chat = count + n, chat or c
        if n == 0:
            reason = "the file is empty" if path.stat().st_size == 0 else "only blank lines or rows"
            expected = describe(form or "prompt_completion", cfg)
            raise DataError(f"{path}: no records ({reason}); expected {expected} per line or record", key)
    return count, chat


def _check_saved(path: Path, split: str, cfg: DataConfig, key: str) -> tuple[int, bool]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    ds = loaded[split] if saved_kind(path) == "dict" else loaded
    label = f"{path} (split {split!r})"
    form = _form_of(ds.column_names, cfg, label, key)
    _check_schema(label, ds.data.schema, form, cfg, key)
    count, chat = _check_rows(_table_rows(label, ds.data.to_batches(max_chunksize=1024)), cfg, form, key)
    if count == 0:
        raise DataError(f"{label}: no records", key)
    return count, chat


def _check_source(cfg: DataConfig) -> bool:
    """Check one local source; returns whether it holds conversations.  Hub datasets pass."""
    key = cfg.source_key
    path = local_path(cfg.source, key)
    if path is None:
        return False
    spec = parse_split(cfg.split, cfg.split_key)
    check_split(cfg.source, spec, key, cfg.split_key)
    if path.is_file():
        count, chat = _check_files([path], cfg, key)
    elif saved_kind(path) is not None:
        count, chat = _check_saved(path, spec.name, cfg, key)
    else:
        count, chat = _check_files(folder_splits(path, key)[spec.name], cfg, key)
    if spec.sliced and len(spec.rows(count)) == 0:
        raise DataError(f"{cfg.split!r} keeps none of the {count} records of {cfg.source!r}", cfg.split_key)
    return chat


def validate_data_source(cfg: DataConfig, tokenizer=None) -> None:
    """Raise ``DataError`` if the training or validation source of ``cfg`` cannot be trained on, and
    ``ConfigError`` naming ``data.chat_template`` if it holds conversations and ``tokenizer`` (when
    given) has no chat template.  Synthetic tasks and hub datasets pass (checked when loaded)."""
    for config in (cfg, cfg.eval_config()):
        if config is None or config.is_synthetic:
            continue
        if _check_source(config) and tokenizer is not None:
            require_chat_template(tokenizer)
