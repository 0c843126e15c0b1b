"""Data: synthetic tasks with a known target distribution, tokenizers, datasets with
prompt/completion masking, and the distributed batch iterator."""

from recall_dist.data.synthetic import (
    KnownSupportTask, ProductConditionalTask, ProductTask, build_task, known_tasks,
)
from recall_dist.data.tokenizer import CharTokenizer, load_tokenizer

__all__ = [
    "KnownSupportTask", "ProductTask", "ProductConditionalTask", "build_task", "known_tasks",
    "CharTokenizer", "load_tokenizer",
]
