"""recall_dist/data/chat.py: conversations through a real ChatML template and a real byte-level BPE
tokenizer (built offline), compared with ChatML text written out by hand."""

from __future__ import annotations

import pytest

from recall_dist.configtree import ConfigError
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.chat import chat_prompt_ids, set_chat_template, tokenize_messages
from tests.data.chat_tokenizer import CHATML, chatml_tokenizer

SYSTEM = {"role": "system", "content": "you are a helpful assistant"}
USER = {"role": "user", "content": "what is two plus two ?"}
ANSWER = {"role": "assistant", "content": "four ."}


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def turn(tok, role: str, content: str, trained: bool) -> tuple[list[int], list[int]]:
    """One ChatML turn written out by hand: header and the newline after it are never trained."""
    head = ids(tok, f"<|im_start|>{role}\n")
    body = [*ids(tok, content), tok.convert_tokens_to_ids("<|im_end|>")]
    tail = ids(tok, "\n")
    input_ids = head + body + tail
    labels = [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body)) + [IGNORE_INDEX]
    return input_ids, labels


def reference(tok, messages, trained: set[int]) -> dict[str, list[int]]:
    input_ids, labels = [], []
    for i, m in enumerate(messages):
        a, b = turn(tok, m["role"], m["content"], i in trained)
        input_ids += a
        labels += b
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("with_system", [True, False])
def test_one_exchange_trains_the_answer_and_its_end_of_turn(tok, with_system):
    messages = ([SYSTEM] if with_system else []) + [USER, ANSWER]
    example = tokenize_messages(messages, tok)
    assert example == reference(tok, messages, {len(messages) - 1})
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "four .<|im_end|>"  # the content and the token that stops it


@pytest.mark.parametrize("with_system", [True, False])
def test_prompt_ids_are_the_prefix_before_the_first_trained_label(tok, with_system):
    messages = ([SYSTEM] if with_system else []) + [USER, ANSWER]
    example = tokenize_messages(messages, tok)
    first = next(i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX)
    prompt = chat_prompt_ids(tok, messages[:-1])
    assert prompt == example["input_ids"][:first]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_multi_turn_all_or_last_assistant_turn(tok):
    messages = [
        SYSTEM,
        USER,
        ANSWER,
        {"role": "user", "content": "three times three ?"},
        {"role": "assistant", "content": "nine"},
    ]
    assert tokenize_messages(messages, tok) == reference(tok, messages, {2, 4})
    last = tokenize_messages(messages, tok, assistant_turns="last")
    assert last == reference(tok, messages, {4})
    # The last turn's prompt ids are the prefix of the conversation before its first trained label.
    first = next(i for i, t in enumerate(last["labels"]) if t != IGNORE_INDEX)
    assert chat_prompt_ids(tok, messages[:-1]) == last["input_ids"][:first]
    with pytest.raises(ValueError, match="assistant_turns = 'first'; allowed: all, last"):
        tokenize_messages(messages, tok, assistant_turns="first")


def test_completion_start_keeps_the_prompt_turns_untrained(tok):
    """TRL's conversational prompt/completion: the prompt's assistant turn is context, not a target."""
    follow_up = [{"role": "user", "content": "and three times three ?"}, {"role": "assistant", "content": "nine"}]
    messages = [USER, ANSWER, *follow_up]
    assert tokenize_messages(messages, tok, completion_start=3) == reference(tok, messages, {3})
    with pytest.raises(ValueError, match=r"no assistant turn to train on \(roles: user\)"):
        tokenize_messages(messages[:3], tok, completion_start=2)


def test_truncation_right_and_drop(tok):
    messages = [USER, ANSWER]
    full = tokenize_messages(messages, tok)
    n = len(full["input_ids"])
    assert tokenize_messages(messages, tok, max_length=n) == full
    cut = tokenize_messages(messages, tok, max_length=n - 2)  # the end-of-turn token is cut too
    assert cut == {"input_ids": full["input_ids"][: n - 2], "labels": full["labels"][: n - 2]}
    first = next(i for i, t in enumerate(full["labels"]) if t != IGNORE_INDEX)
    assert tokenize_messages(messages, tok, max_length=first) is None  # no trained token left
    assert tokenize_messages(messages, tok, max_length=n - 1, truncation="drop") is None


def test_no_template_names_the_key_and_data_chat_template_sets_one(tmp_path):
    bare = chatml_tokenizer(template=None)
    for call in (lambda: tokenize_messages([USER, ANSWER], bare), lambda: chat_prompt_ids(bare, [USER])):
        with pytest.raises(ConfigError, match=r"^data.chat_template: chat data .* has none: set data.chat_template"):
            call()
    set_chat_template(bare, CHATML)
    assert tokenize_messages([USER, ANSWER], bare) == tokenize_messages([USER, ANSWER], chatml_tokenizer())
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    from_file = chatml_tokenizer(template=None)
    set_chat_template(from_file, str(path))
    assert from_file.chat_template == CHATML
    with pytest.raises(ConfigError, match=r"data.chat_template: 'nope.jinja': no such file"):
        set_chat_template(from_file, "nope.jinja")
    with pytest.raises(ConfigError, match=r"data.chat_template: the template does not render"):
        set_chat_template(from_file, "{% for m in messages %}{{ m.content }")


def test_bad_messages_are_named(tok):
    with pytest.raises(ValueError, match=r"messages\[1\]: 'content' is None; expected a string"):
        tokenize_messages([USER, {"role": "assistant", "content": None}], tok)
    with pytest.raises(ValueError, match="expected a non-empty list"):
        tokenize_messages([], tok)
    with pytest.raises(ValueError, match=r"roles: user, assitant"):
        tokenize_messages([USER, {"role": "assitant", "content": "four"}], tok)


def test_a_template_that_renders_earlier_turns_differently_is_refused():
    """A template that renders the last message unlike the others cannot locate the turns."""
    odd = chatml_tokenizer(
        "{% for m in messages %}{% if loop.last %}<last>{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders the conversation up to it differently"):
        tokenize_messages([USER, ANSWER], odd)
