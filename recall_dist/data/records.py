"""The forms a row of training data takes, told apart by its columns (as TRL tells them apart), and the
record each becomes for ``build_dataset``:

- chat: ``messages`` (``data.messages_field``), a list of ``{"role", "content"}`` turns
  -> ``{"messages": [...]}``, the assistant turns trained (``data.assistant_turns``);
- prompt/completion strings (``data.prompt_field`` / ``data.completion_field``)
  -> ``{"prompt": str, "completion": str}``, the completion trained;
- prompt/completion message lists (TRL's conversational form)
  -> ``{"messages": prompt + completion, "completion_start": len(prompt)}``, the completion's assistant
  turns trained;
- text: ``{"text": str}`` (a ``.txt`` file's lines) -> ``{"prompt": "", "completion": text}``, all of it
  trained; blank lines are skipped.

The form is decided once per source, from its columns (or its first record): a ``messages`` column wins,
then prompt/completion, then ``text``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recall_dist.configtree import ConfigError
from recall_dist.data.chat import check_messages

if TYPE_CHECKING:
    from recall_dist.data.config import DataConfig

TEXT_FIELD = "text"
DEFAULT_MESSAGES_FIELD = "messages"


class RecordError(ValueError):
    """A row does not have the form of its source (the message says what is wrong, not where)."""


def detect_form(columns, cfg: DataConfig, key: str = "data.source", where: str = "") -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"`` for a source with these column names
    (``where``: the source, or the record, that errors name)."""
    columns = list(columns)
    if cfg.messages_field in columns:
        return "messages"
    if cfg.messages_field != DEFAULT_MESSAGES_FIELD:  # set on purpose: its absence is the error
        raise ConfigError(
            "data.messages_field",
            f"{cfg.messages_field!r} is not a column of {where}; columns: {', '.join(columns) or 'none'}",
        )
    if cfg.completion_field in columns or (cfg.prompt_field and cfg.prompt_field in columns):
        return "prompt_completion"
    if TEXT_FIELD in columns:
        return "text"
    raise ConfigError(
        key,
        f"{where}: no column for any data form: chat {cfg.messages_field!r} (data.messages_field), "
        f"{cfg.prompt_field!r}/{cfg.completion_field!r} (data.prompt_field/data.completion_field) or 'text'; "
        f"its columns: {', '.join(columns) or 'none'} (set data.prompt_field/completion_field to yours)",
    )


def form_fields(form: str, cfg: DataConfig) -> list[tuple[str | None, str]]:
    """``(config key, column)`` pairs a record of ``form`` needs (the ``text`` column has no key)."""
    if form == "messages":
        return [("messages_field", cfg.messages_field)]
    if form == "text":
        return [(None, TEXT_FIELD)]
    fields = [("prompt_field", cfg.prompt_field)] if cfg.prompt_field else []
    return [*fields, ("completion_field", cfg.completion_field)]


def describe(form: str, cfg: DataConfig) -> str:
    """What a record of ``form`` looks like, for error messages."""
    if form == "messages":
        return f"a JSON object with a {cfg.messages_field!r} list of {{'role', 'content'}} messages"
    fields = [f for _, f in form_fields(form, cfg)]
    names = " and ".join(repr(f) for f in fields)
    return f"a JSON object with string field{'s' if len(fields) > 1 else ''} {names}"


def _assistant_required(messages: list[dict], where: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
        raise RecordError(f"{where} has no assistant turn, so nothing to train on (roles: {roles})")


def _messages(value, where: str) -> list[dict]:
    try:
        check_messages(value, where)
    except ValueError as e:
        raise RecordError(str(e)) from None
    return value


def _conversational(prompt, completion, cfg: DataConfig) -> dict:
    p_name, c_name = repr(cfg.prompt_field), repr(cfg.completion_field)
    prompt = _messages(prompt, p_name) if cfg.prompt_field else []
    completion = _messages(completion, c_name)
    _assistant_required(completion, c_name)
    return {"messages": [*prompt, *completion], "completion_start": len(prompt)}


def to_record(row: dict, form: str, cfg: DataConfig) -> dict | None:
    """The record of one row of a source of ``form`` (None: a blank text line, skipped); ``RecordError``
    says what does not fit."""
    for key, field in form_fields(form, cfg):
        if field not in row:
            raise RecordError(f"no {field!r} field" + (f" (data.{key})" if key else ""))
    if form == "messages":
        messages = _messages(row[cfg.messages_field], repr(cfg.messages_field))
        _assistant_required(messages, repr(cfg.messages_field))
        return {"messages": messages}
    if form == "text":
        text = row[TEXT_FIELD]
        if not isinstance(text, str):
            raise RecordError(f"'text' is {text!r:.80}; expected a string")
        return {"prompt": "", "completion": text} if text.strip() else None
    prompt = row[cfg.prompt_field] if cfg.prompt_field else ""
    completion = row[cfg.completion_field]
    if isinstance(completion, list):
        return _conversational(prompt, completion, cfg)
    for field, value in ((cfg.prompt_field, prompt), (cfg.completion_field, completion)):
        if field and not isinstance(value, str):
            raise RecordError(f"{field!r} is {value!r:.80}; expected a string")
    return {"prompt": prompt, "completion": completion}
