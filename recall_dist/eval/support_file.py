"""A user's own known supports for ``recall-dist sweep`` (``metric: known_support``, ``support: FILE``):
a jsonl file of ``{"prompt": str, "completion": str, "p": float}`` or ``{"messages": [...], "completion":
str, "p": float}`` rows; the rows with the same prompt (the same messages) form that prompt's support,
P(completion | prompt) = p.

``SupportFile`` answers what the sweep asks a built-in task (``prompts``, ``prompt_distribution``,
``target_distribution``), with the prompts weighted equally (the tables report the mean over prompts),
and ``encode`` tokenizes a support exactly as training tokenizes the row it stands for:

- ``prompt`` string: ``data.tokenize_example`` (bos, prompt, completion, eos; completion and eos scored);
- ``messages``: the conversation ``messages + [{"role": "assistant", "content": completion}]`` through the
  tokenizer's chat template by ``data.chat.tokenize_messages`` with the reply as the only trained turn
  (reply and end-of-turn token scored, like TRL's prompt/completion conversational rows in training).

The scored ids must follow the prompt's own ids (what a generation starts from) with nothing in
between: a completion that the tokenizer merges with the end of the prompt is an error that shows
both tokenizations.  ``write_support_file`` writes such a file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.chat import chat_prompt_ids, check_messages, tokenize_messages
from recall_dist.eval.known_support import EncodedPrompt, encode_prompt
from recall_dist.io import atomic_write_text

P_TOLERANCE = 1e-6  # |sum_x p(x) - 1| allowed per prompt without ``normalize_p``
ROW_KEYS = '{"prompt": str, "completion": str, "p": float} or {"messages": [...], "completion": str, "p": float}'


@dataclass
class Support:
    """One prompt's support: its completions, their P (summing to 1) and the file lines they came from."""

    prompt: str | list[dict]
    completions: list[str]
    p: np.ndarray
    lines: list[int]


def prompt_key(prompt: str | list[dict]) -> str:
    """The string that names a prompt in work items, seeds and tables: the prompt itself, or the
    messages as compact JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False, separators=(",", ":"))


def _row_prompt(row: dict, where: str) -> str | list[dict]:
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        what = "both" if has_prompt else "neither"
        raise ValueError(f"{where}: has {what} of 'prompt' and 'messages'; a row is {ROW_KEYS}")
    if has_prompt and isinstance(row["prompt"], str):
        return row["prompt"]
    messages = row["messages"] if has_messages else row["prompt"]  # a message-list prompt (TRL's form)
    name = "messages" if has_messages else "prompt"
    check_messages(messages, f"{where}: {name!r}")
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            f"{where}: {name!r} ends with an assistant turn; it holds the turns before the reply, and "
            f"'completion' is the reply"
        )
    return messages


def parse_row(row, where: str) -> tuple[str | list[dict], str, float]:
    """(prompt, completion, p) of one row; ``ValueError`` names ``where``, the key and the bad value."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object {ROW_KEYS}, got {row!r:.80}")
    missing = [key for key in ("completion", "p") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))}; a row is {ROW_KEYS}")
    prompt = _row_prompt(row, where)
    completion, p = row["completion"], row["p"]
    if not isinstance(completion, str):
        raise ValueError(f"{where}: 'completion' is {completion!r:.80}; expected a string")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(
            f"{where}: 'p' is {p!r:.80}; expected a number > 0 (a completion with P = 0 is outside the support)"
        )
    return prompt, completion, float(p)


def _check_sums(supports: dict[str, Support], source: str, normalize_p: bool) -> None:
    for support in supports.values():
        total = float(support.p.sum())
        if normalize_p:
            support.p = support.p / total
        elif abs(total - 1.0) > P_TOLERANCE:
            raise ValueError(
                f"support {source}, prompt {prompt_key(support.prompt)!r:.120} (lines {support.lines[0]}-"
                f"{support.lines[-1]}, {len(support.lines)} rows): its 'p' sum to {total!r}, not 1 (tolerance "
                f"{P_TOLERANCE}); fix them, or set normalize_p: true to divide them by their sum"
            )


def supports_from_rows(numbered_rows, source: str, normalize_p: bool = False) -> dict[str, Support]:
    """``prompt_key -> Support`` of ``(line number, row)`` pairs, prompts in the order of their first row."""
    supports: dict[str, Support] = {}
    kinds: dict[str, type] = {}
    for line_no, row in numbered_rows:
        where = f"support {source}, line {line_no}"
        prompt, completion, p = parse_row(row, where)
        key = prompt_key(prompt)
        if kinds.setdefault(key, type(prompt)) is not type(prompt):
            raise ValueError(f"{where}: prompt string {key!r:.80} equals another row's messages as JSON")
        support = supports.setdefault(key, Support(prompt, [], np.zeros(0), []))
        if completion in support.completions:
            first = support.lines[support.completions.index(completion)]
            raise ValueError(
                f"{where}: duplicate completion {completion!r:.80} for prompt {key!r:.80} (first on line {first}); "
                f"each completion appears once in its support (add up their p)"
            )
        support.completions.append(completion)
        support.p = np.append(support.p, p)
        support.lines.append(line_no)
    if not supports:
        raise ValueError(f"support {source}: the file holds no rows; give at least one {ROW_KEYS}")
    _check_sums(supports, source, normalize_p)
    return supports


def _json_lines(path: str | Path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"support {path}, line {line_no}: not JSON ({e.msg} at column {e.colno})"
                    ) from None


def read_supports(path: str | Path, normalize_p: bool = False) -> dict[str, Support]:
    """``prompt_key -> Support`` of a support file (``supports_from_rows`` of its non-blank lines)."""
    return supports_from_rows(_json_lines(path), str(path), normalize_p)


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids)) if hasattr(tokenizer, "convert_ids_to_tokens") else list(ids)


def _boundary_error(where: str, tokenizer, head: list[int], ids: list[int], labels: list[int]) -> ValueError:
    window = 6
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
    return ValueError(
        f"{where}: the completion's tokens differ when tokenized inside the prompt: the prompt alone ends with "
        f"{_tokens(tokenizer, head[-window:])} ({len(head)} tokens), the conversation with the reply has "
        f"{_tokens(tokenizer, ids[max(0, len(head) - window) : len(head) + window])} around token {len(head)}, its "
        f"first scored token at {first}; the reply must start on a token boundary of the rendered prompt "
        f"(e.g. no leading whitespace the template's generation prompt could merge with)"
    )


def _chat_completion(tokenizer, messages: list[dict], head: list[int], completion: str, where: str) -> tuple:
    """The scored ids of ``completion`` as the reply to ``messages`` (reply + end-of-turn)."""
    conversation = [*messages, {"role": "assistant", "content": completion}]
    example = tokenize_messages(conversation, tokenizer, completion_start=len(messages))
    if example is None:
        raise ValueError(f"{where}: the chat template renders no token of the reply {completion!r:.80}")
    ids, labels = example["input_ids"], example["labels"]
    scored = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    contiguous = scored == list(range(len(head), len(head) + len(scored)))
    if ids[: len(head)] != head or not contiguous or any(labels[i] != ids[i] for i in scored):
        raise _boundary_error(where, tokenizer, head, ids, labels)
    return tuple(ids[i] for i in scored)


def _require_template(tokenizer, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError(
            f"support {source}: rows with 'messages' need a chat template and tokenizer {type(tokenizer).__name__} "
            f"has none: save the model's tokenizer with the chat template it was trained with, or point the model "
            f"entry's 'tokenizer' at a directory whose tokenizer has it"
        )


def encode_support(tokenizer, support: Support, source: str = "file", sampled: bool = False) -> EncodedPrompt:
    """``support`` tokenized as training tokenizes its rows (module docstring): the prompt's ids and
    each completion's scored ids.  Two completions with the same ids are an error (Q would count twice);
    so is, when ``sampled`` (the sweep's sampled estimates, which stop at eos), a completion whose last
    scored token is not the tokenizer's eos."""
    where = f"support {source}, prompt {prompt_key(support.prompt)!r:.120}"
    target = dict(zip(support.completions, support.p.tolist(), strict=True))
    if isinstance(support.prompt, str):
        encoded = encode_prompt(tokenizer, support.prompt, target)
    else:
        _require_template(tokenizer, source)
        head = chat_prompt_ids(tokenizer, support.prompt)
        completions = [
            _chat_completion(tokenizer, support.prompt, head, text, f"support {source}, line {line}")
            for text, line in zip(support.completions, support.lines, strict=True)
        ]
        encoded = EncodedPrompt(head, completions, support.p.copy(), list(support.completions))
    seen: dict[tuple, int] = {}
    for k, ids in enumerate(encoded.completions):
        if ids in seen:
            j = seen[ids]
            raise ValueError(
                f"{where}: completions {support.completions[j]!r:.60} (line {support.lines[j]}) and "
                f"{support.completions[k]!r:.60} (line {support.lines[k]}) tokenize to the same ids {list(ids)[:12]}"
            )
        seen[ids] = k
        if sampled and ids[-1] != tokenizer.eos_token_id:
            raise ValueError(
                f"support {source}, line {support.lines[k]}: the reply ends with {_tokens(tokenizer, ids[-1:])}, not "
                f"the tokenizer's eos {_tokens(tokenizer, [tokenizer.eos_token_id])}, so sampling (which stops at eos) "
                f"cannot produce it: set num_samples: 0 (exact metrics only) or give the tokenizer that eos"
            )
    return encoded


class SupportFile:
    """A support file as the sweep's known-support task: the same ``prompts`` / ``prompt_distribution`` /
    ``target_distribution`` as a built-in task (prompt keys: ``prompt_key``), plus ``encode``."""

    def __init__(self, path: str | Path, normalize_p: bool = False):
        self.path = str(path)
        self.supports = read_supports(path, normalize_p)

    def prompts(self) -> list[str]:
        return list(self.supports)

    def prompt_distribution(self) -> dict[str, float]:
        """Every prompt weighs the same: the sweep's tables are means over prompts."""
        return dict.fromkeys(self.supports, 1.0 / len(self.supports))

    def target_distribution(self, key: str) -> dict[str, float]:
        support = self.supports[key]
        return dict(zip(support.completions, support.p.tolist(), strict=True))

    def encode(self, tokenizer, key: str, sampled: bool = False) -> EncodedPrompt:
        return encode_support(tokenizer, self.supports[key], self.path, sampled)


def write_support_file(rows, path: str | Path) -> Path:
    """Write ``rows`` (dicts ``{"prompt" | "messages", "completion", "p"}``, extra keys kept) as a support
    file, checked as the sweep reads it (``read_supports``, p summing to 1 per prompt); atomic."""
    rows = list(rows)
    supports_from_rows(enumerate(rows, start=1), str(path))  # before writing: a bad file is never left behind
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
