"""A tiny Llama, a character tokenizer as a real ``PreTrainedTokenizerFast`` (built in memory: no
downloads) and a raw-text dataset of products ``a*b=c``, for real ``Trainer`` / TRL runs on CPU;
plus an independent reference loss computed from full logits."""

from __future__ import annotations

import os

import torch

ALPHABET = "0123456789*="
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # TRL sends a telemetry ping from its trainers otherwise
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=3 + len(ALPHABET),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def product_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [f"{a}*{b}={a * b}" for a, b in torch.randint(1, 10, (n, 2), generator=g).tolist()]


def text_dataset(n: int = 64, seed: int = 0):
    from datasets import Dataset

    return Dataset.from_dict({"text": product_texts(n, seed)})


def reference_loss(model, batches: list[dict], alpha: float | None) -> torch.Tensor:
    """Weighted NLL from full logits over several batches together (one step): w = exp((alpha-1) l)
    detached (c-Div; ``alpha=None``: NLL), L = sum w l / sum w over every valid shifted target.
    Packed batches are run with their ``position_ids`` and targets that start a sequence excluded."""
    nll = []
    for b in batches:
        kwargs = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}
        # use_cache=False: with a cache, transformers does not derive the packed block-diagonal mask
        logits = model(input_ids=b["input_ids"], use_cache=False, **kwargs).logits
        target = b["labels"][:, 1:]
        if "position_ids" in b:
            target = target.masked_fill(b["position_ids"][:, 1:] == 0, -100)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
        valid = target != -100
        nll.append(-logp[valid].gather(1, target[valid].unsqueeze(1)).squeeze(1))
    nll = torch.cat(nll)
    w = torch.ones_like(nll) if alpha is None else torch.exp((alpha - 1.0) * nll.detach())
    return (w * nll).sum() / w.sum()
