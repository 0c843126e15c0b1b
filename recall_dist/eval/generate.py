"""Batched tempered sampling with a KV cache: many prompts and all temperatures in one decode loop.

A *row* is (prompt ids, temperature T, seed).  Rows of any prompts and temperatures share one batch:
each row's logits are divided by its own T, so a sweep decodes every temperature of a chunk of
prompts together instead of one ``generate`` call per temperature.  Rows with the same prompt share
one prefill (the cache is expanded to them), and rows that have stopped leave the batch (the cache
keeps only the live rows), so a batch costs what its longest rows cost, not rows x longest.

Sampling is exact and reproducible per row: token t of a row is the inverse-CDF draw of Q_T =
softmax(z / T) (full vocabulary, no top-k/top-p) at the row's own uniform u_t, and the uniforms come
from a generator seeded with the row's seed alone.  So a row's text depends only on (model, prompt,
T, seed), never on which rows share its batch, how many there are, or which rank computes it (up to
float rounding of batched matmuls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleRow:
    prompt: tuple[int, ...]
    temperature: float
    seed: int


def row_uniforms(seed: int, max_new_tokens: int) -> torch.Tensor:
    """The uniforms [max_new_tokens] float64 that decide a row's tokens (its own generator)."""
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return torch.rand(max_new_tokens, generator=g, dtype=torch.float64)


def inverse_cdf_sample(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens [B]: for each row b, the smallest id whose cumulative Q_T mass exceeds u[b].

    logits [B, V] (any float dtype; computed in fp32), temperature [B], u [B] in [0, 1)."""
    probs = torch.softmax(logits.float() / temperature[:, None].float(), dim=-1)
    cdf = probs.cumsum(dim=-1)
    # The last cumulative value is 1 up to rounding: scale u to it so a draw never falls off the end.
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _sample_batch(model, rows: Sequence[SampleRow], max_new_tokens: int, stop_ids: set[int], pad_id: int):
    from transformers import DynamicCache

    device = next(model.parameters()).device
    unique = list(dict.fromkeys(r.prompt for r in rows))
    ids, mask = _left_pad(unique, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp_(min=0)
    cache = DynamicCache()
    kw = cache_keyword(model)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{kw: cache}
    )
    # Expand the prefill of each unique prompt to its rows.
    owner = torch.tensor([unique.index(r.prompt) for r in rows], device=device)
    cache.batch_select_indices(owner)
    logits, mask, next_pos = out.logits[owner, -1], mask[owner], positions[owner, -1] + 1
    temps = torch.tensor([r.temperature for r in rows], device=device)
    uniforms = torch.stack([row_uniforms(r.seed, max_new_tokens) for r in rows]).to(device)
    live = torch.arange(len(rows), device=device)  # the batch positions' row indices
    generated: list[list[int]] = [[] for _ in rows]
    stops = torch.tensor(sorted(stop_ids), device=device)
    for step in range(max_new_tokens):
        tokens = inverse_cdf_sample(logits, temps[live], uniforms[live, step])
        for row, token in zip(live.tolist(), tokens.tolist(), strict=True):
            generated[row].append(token)
        keep = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():  # stopped rows leave the batch, and their cache with them
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            live, tokens, mask, next_pos = live[idx], tokens[idx], mask[idx], next_pos[idx]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{kw: cache},
        )
        logits, next_pos = out.logits[:, -1], next_pos + 1
    return generated


def sample_rows(
    model,
    rows: Sequence[SampleRow],
    max_new_tokens: int,
    stop_ids: set[int] | Sequence[int],
    pad_id: int,
    batch_rows: int = 256,
) -> list[list[int]]:
    """The generated ids of every row (up to and including its first stop id, or ``max_new_tokens``
    ids), in ``rows`` order, decoded ``batch_rows`` rows at a time."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
    if batch_rows < 1:
        raise ValueError(f"batch_rows = {batch_rows}: must be >= 1")
    for r in rows:
        if not r.prompt:
            raise ValueError("a prompt must hold at least one token (a bos, or the chat template's prefix)")
        if not r.temperature > 0:
            raise ValueError(f"temperature = {r.temperature}: must be > 0")
    stop_ids = set(stop_ids)
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_rows):
        out += _sample_batch(model, rows[start : start + batch_rows], max_new_tokens, stop_ids, pad_id)
    return out


def stop_token_ids(model, tokenizer) -> set[int]:
    """Where generation stops: the tokenizer's eos and every eos id of the model's generation config
    (chat models end a turn with their own token, e.g. ``<|im_end|>``)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    if not ids:
        raise ValueError("the tokenizer and the model's generation config name no eos token: generation cannot stop")
    return ids


def strip_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """A row's ids before its first stop id."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids
