"""Data: synthetic tasks with a known target distribution, tokenizers, datasets with
prompt/completion masking, chat conversations through the tokenizer's template, and the distributed
batch iterator."""

from recall_dist.data.chat import chat_prompt_ids, set_chat_template, tokenize_messages
from recall_dist.data.config import DataConfig
from recall_dist.data.dataset import (
    IGNORE_INDEX,
    build_dataset,
    encode_text,
    load_records,
    tokenize_example,
)
from recall_dist.data.loader import DistributedBatchIterator
from recall_dist.data.synthetic import (
    KnownSupportTask,
    ProductConditionalTask,
    ProductTask,
    build_task,
    known_tasks,
)
from recall_dist.data.tokenizer import CharTokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "CharTokenizer",
    "DataConfig",
    "DistributedBatchIterator",
    "KnownSupportTask",
    "ProductConditionalTask",
    "ProductTask",
    "build_dataset",
    "build_task",
    "chat_prompt_ids",
    "encode_text",
    "known_tasks",
    "load_records",
    "load_tokenizer",
    "set_chat_template",
    "tokenize_example",
    "tokenize_messages",
]
