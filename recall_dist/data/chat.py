"""Chat conversations as training examples: ``messages`` (role/content turns) rendered through the
tokenizer's chat template, with the loss on the assistant turns only, and the prompt ids a generation
starts from.

A trained assistant turn covers its content *and* the end-of-turn text the template writes right
after it (ChatML's ``<|im_end|>``), so the model learns to stop; the whitespace a template puts
between turns, the generation prompt (``<|im_start|>assistant\\n``) and every other turn carry -100.
The spans come from the template itself: the turn starts where ``messages[:i]`` rendered with the
generation prompt ends, and ends where ``messages[:i + 1]`` rendered ends (trailing whitespace
excluded), so any template whose earlier turns render the same whatever follows them works.
"""

from __future__ import annotations

from pathlib import Path

from recall_dist.configtree import ConfigError
from recall_dist.constants import IGNORE_INDEX

TEMPLATE_KEY = "data.chat_template"
ASSISTANT_TURNS = ("all", "last")


def set_chat_template(tokenizer, template: str | None) -> None:
    """Give ``tokenizer`` the chat template of ``data.chat_template``: a Jinja template string, or the
    path of a ``.jinja`` file holding one.  None leaves the tokenizer's own template.  A template that
    does not render a two-turn conversation raises ``ConfigError`` naming the key."""
    if template is None:
        return
    if template.endswith((".jinja", ".j2")) or "{" not in template:  # a path, not a template
        path = Path(template).expanduser()
        if not path.is_file():
            raise ConfigError(TEMPLATE_KEY, f"{template!r}: no such file (give a .jinja file or a template string)")
        template = path.read_text(encoding="utf-8")
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ConfigError(
            TEMPLATE_KEY,
            f"tokenizer {type(tokenizer).__name__} cannot render chat templates (a Hugging Face tokenizer can)",
        )
    tokenizer.chat_template = template
    try:
        render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    except ValueError as e:
        raise ConfigError(TEMPLATE_KEY, f"the template does not render a user/assistant conversation: {e}") from None


def require_chat_template(tokenizer) -> None:
    """Raise ``ConfigError`` naming ``data.chat_template`` when ``tokenizer`` has no chat template."""
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ConfigError(
            TEMPLATE_KEY,
            f"chat data ('messages') needs a chat template, and tokenizer {type(tokenizer).__name__} has none: set "
            f"data.chat_template to a Jinja template string or a .jinja file (e.g. ChatML)",
        )


def check_messages(messages, where: str = "messages") -> None:
    """Raise ``ValueError`` unless ``messages`` is a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}[{i}]: expected a {{'role', 'content'}} object, got {message!r:.80}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"{where}[{i}]: {key!r} is {message.get(key)!r:.80}; expected a string")


def trained_turns(messages: list[dict], assistant_turns: str = "all", completion_start: int = 0) -> list[int]:
    """Indices of the assistant turns that carry the loss: all of them from ``completion_start`` on,
    or the last one (``assistant_turns="last"``)."""
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns = {assistant_turns!r}; allowed: {', '.join(ASSISTANT_TURNS)}")
    turns = [i for i, m in enumerate(messages) if i >= completion_start and m["role"] == "assistant"]
    return turns[-1:] if assistant_turns == "last" else turns


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """``messages`` through the tokenizer's chat template, as text (template errors as ``ValueError``)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError, or a template's own raise_exception(...)
        raise ValueError(f"the chat template failed on {len(messages)} message(s): {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def _prefix_length(tokenizer, text: str, messages: list[dict], generation_prompt: bool, turn: int) -> int:
    prefix = render(tokenizer, messages, generation_prompt)
    if not text.startswith(prefix):
        raise ValueError(
            f"assistant turn {turn}: the chat template renders the conversation up to it differently from the "
            f"whole conversation (it depends on what follows), so the turn cannot be located: {prefix[-60:]!r}"
        )
    return len(prefix)


def assistant_spans(tokenizer, messages: list[dict], text: str, turns: list[int]) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` in ``text`` (the rendered conversation) of the assistant
    ``turns``: the content and the end-of-turn text after it, not the whitespace between turns."""
    spans = []
    for i in turns:
        start = _prefix_length(tokenizer, text, messages[:i], True, i)
        end = _prefix_length(tokenizer, text, messages[: i + 1], False, i)
        end = start + len(text[start:end].rstrip())
        spans.append((start, end))
    return spans


def _encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__}: chat data needs a fast (Rust) tokenizer, whose character "
            "offsets place the assistant turns"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def tokenize_messages(
    messages: list[dict],
    tokenizer,
    *,
    assistant_turns: str = "all",
    max_length: int | None = None,
    truncation: str = "right",
    completion_start: int = 0,
) -> dict[str, list[int]] | None:
    """``{"input_ids": [...], "labels": [...]}`` of a conversation, like ``dataset.tokenize_example``:
    labels aligned with input_ids (the trainer shifts), the token id on the trained assistant turns
    (``trained_turns``: content and end-of-turn token), -100 elsewhere.

    The conversation is rendered once by the chat template and tokenized once without special tokens
    (the template writes bos if it wants one).  A token belongs to a turn when it starts inside the
    turn's span, so a token that straddles the span's start stays with the prompt.  Truncation as in
    ``DataConfig``: ``right`` cuts to ``max_length`` tokens, ``drop`` drops a longer conversation;
    a conversation with no trained token left is dropped (None).  Turns with an index below
    ``completion_start`` are never trained (the prompt of a prompt/completion pair).
    """
    check_messages(messages)
    require_chat_template(tokenizer)
    turns = trained_turns(messages, assistant_turns, completion_start)
    if not turns:
        roles = ", ".join(dict.fromkeys(m["role"] for m in messages[completion_start:]))
        raise ValueError(f"no assistant turn to train on (roles: {roles or 'none'})")
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text, turns)
    input_ids, offsets = _encode_with_offsets(tokenizer, text)
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(input_ids, offsets, strict=True)
    ]
    return truncate_example(input_ids, labels, max_length, truncation)


def truncate_example(
    input_ids: list[int], labels: list[int], max_length: int | None, truncation: str
) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` within ``max_length``: cut on the right (``truncation: right``) or
    dropped (``drop``: None); an example left without a trained token is dropped too (None).  The one
    rule for every record form (``tokenize_messages`` and ``dataset.tokenize_example``)."""
    if max_length is not None and len(input_ids) > max_length:
        if truncation == "drop":
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids a generation of the next assistant turn starts from: ``messages`` (everything before
    the reply) rendered with the generation prompt, tokenized as ``tokenize_messages`` tokenizes."""
    check_messages(messages)
    require_chat_template(tokenizer)
    text = render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
