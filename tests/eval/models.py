"""Tiny real Hugging Face Llama models for the eval tests, saved with our CharTokenizer.

``bigram_llama`` sets the weights by hand so that the logits after token i are exactly the row
B[i] of a given matrix: one decoder layer whose output projections are zero (the residual stream
is the embedding), one-hot embeddings, and an lm_head that undoes the final RMSNorm's scale.
Its tempered sequence distribution can then be written down from B alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recall_dist.data import CharTokenizer

HIDDEN = 16


def _config(vocab_size: int, hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rms_norm_eps=1e-12,
        tie_word_embeddings=False,
    )


def bigram_llama(bigram_logits: np.ndarray) -> LlamaForCausalLM:
    """A Llama whose next-token logits after token i are ``bigram_logits[i]`` (any context)."""
    vocab = bigram_logits.shape[0]
    assert vocab <= HIDDEN
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(vocab, HIDDEN, layers=1)).eval()
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros(vocab, HIDDEN)
        emb[torch.arange(vocab), torch.arange(vocab)] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        model.model.norm.weight.fill_(1.0)
        scale = 1.0 / np.sqrt(1.0 / HIDDEN + model.config.rms_norm_eps)  # RMSNorm of a one-hot vector
        head = torch.zeros(vocab, HIDDEN)
        head[:, :vocab] = torch.tensor(bigram_logits.T / scale, dtype=torch.float32)
        model.lm_head.weight.copy_(head)
    return model


def random_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(vocab_size, 32, layers=2)).eval()


def save(model, tokenizer: CharTokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
