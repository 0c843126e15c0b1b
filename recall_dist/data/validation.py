"""Check a local data file before training starts: every record readable, with the configured
prompt/completion fields as strings, and at least one record.  An error names the file, the line (or
row) and what was expected; the trainer runs this before any process group exists, and
``recall-dist train`` turns it into exit code 2 like a config error.
"""

from __future__ import annotations

import json
from pathlib import Path

from recall_dist.configtree import ConfigError
from recall_dist.data.dataset import DataConfig


class DataError(ConfigError):
    """A data file's content is not what ``DataConfig`` describes (raised as ``data.source: ...``)."""

    def __init__(self, message: str):
        super().__init__("data.source", message)


def _expected(cfg: DataConfig) -> str:
    fields = [f for f in (cfg.prompt_field, cfg.completion_field) if f]
    names = " and ".join(repr(f) for f in fields)
    return f"a JSON object with string field{'s' if len(fields) > 1 else ''} {names}"


def _check_record(record, cfg: DataConfig, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected {_expected(cfg)}, got a JSON {type(record).__name__}: {record!r:.80}")
    for key, field in (("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field)):
        if not field:
            continue
        if field not in record:
            raise DataError(
                f"{where}: no {field!r} field (data.{key}); expected {_expected(cfg)}; "
                f"this record has: {', '.join(map(repr, record)) or 'no fields'}"
            )
        if not isinstance(record[field], str):
            raise DataError(f"{where}: {field!r} is {record[field]!r:.80}; expected a string")


def _check_json_lines(path: Path, cfg: DataConfig) -> int:
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}, column {e.colno}: not valid JSON ({e.msg}); expected one object per line, "
                    f"{_expected(cfg)}: {line.strip()[:80]!r}"
                ) from None
            _check_record(record, cfg, where)
            count += 1
    return count


def _check_json(path: Path, cfg: DataConfig) -> int:
    """A ``.json`` file: a JSON array of records, or JSON lines (what ``datasets`` reads from it)."""
    text = path.read_bytes()
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _check_json_lines(path, cfg)  # not one document: JSON lines, reported per line
    if isinstance(document, dict):  # a single record on one line is JSON lines of length 1
        _check_record(document, cfg, f"{path}, line 1")
        return 1
    if not isinstance(document, list):
        raise DataError(
            f"{path}: expected a JSON array of records or one record per line, got a {type(document).__name__}"
        )
    for i, record in enumerate(document):
        _check_record(record, cfg, f"{path}, record {i}")
    return len(document)


def _check_parquet(path: Path, cfg: DataConfig) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    schema = meta.schema.to_arrow_schema()
    for key, field in (("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field)):
        if not field:
            continue
        if field not in schema.names:
            raise DataError(f"{path}: no column {field!r} (data.{key}); columns: {', '.join(schema.names) or 'none'}")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {field!r} has type {kind}; expected strings")
    return meta.num_rows


_CHECKS = {".jsonl": _check_json_lines, ".json": _check_json, ".parquet": _check_parquet}


def validate_data_source(cfg: DataConfig) -> None:
    """Raise ``DataError`` if ``cfg.source`` is a local data file whose content cannot be trained on.
    Synthetic tasks and hub datasets pass (their errors name the dataset when it is loaded)."""
    if cfg.is_synthetic:
        return
    path = Path(cfg.source).expanduser()
    check = _CHECKS.get(path.suffix.lower())
    if check is None or not path.is_file():
        return
    if check(path, cfg) == 0:
        raise DataError(
            f"{path}: no records (the file is empty); expected {_expected(cfg)} "
            f"{'per line' if check is _check_json_lines else 'per record'}"
        )
