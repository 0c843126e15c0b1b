"""How the sweep talks to a model: text into ids through training's own tokenization
(``recall_dist.data.tokenize_example``), so the ids evaluated are the ids trained on; padded
batches (one place that knows the pad id and how rows are aligned); and pure tempered sampling."""

from __future__ import annotations

import torch

from recall_dist.data.dataset import tokenize_example


def prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The ids a training example of ``prompt`` starts with: for a string, bos (if any) then the
    prompt, the unlabelled head of ``tokenize_example``; for chat messages (role/content turns
    before the reply), the conversation rendered by the chat template with its generation prompt,
    the head of ``data.chat.tokenize_messages``.  So generation conditions on exactly what training saw."""
    if isinstance(prompt, list):
        from recall_dist.data.chat import chat_prompt_ids

        return chat_prompt_ids(tokenizer, prompt)
    example = tokenize_example(prompt, "", tokenizer)
    return example["input_ids"][: len(example["input_ids"]) - 1]  # drop the eos of the empty completion


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padded positions are masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_batch(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both ``[len(rows), max len]`` long.  Right padding for teacher
    forcing; left padding for ``generate`` (every row's last prompt token in the same column)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def tempered_generate(
    model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, max_new_tokens: int, pad_id, eos_id
):
    """``generate`` from Q_T itself: ``do_sample=True, temperature=T, top_k=0, top_p=1`` (no truncation
    of the distribution, so samples estimate the metrics of Q_T).  Seed the RNG before calling."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=float(temperature),
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
