"""Facts every layer shares, defined once: the label id that carries no loss, and the dtype names a
config may use.  Imports nothing from the package (the bottom of the dependency graph)."""

from __future__ import annotations

import torch

# Hugging Face / PyTorch convention: labels equal to this id are excluded from the loss, the weights,
# the truncation buffer and every count.  It lies outside every vocabulary shard.
IGNORE_INDEX = -100

# Config dtype names -> torch dtypes (model storage ``model.dtype``, FSDP2 ``fsdp_reduce_dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
