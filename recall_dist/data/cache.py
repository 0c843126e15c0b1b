"""Tokenised datasets cached once and shared by the ranks.

Rank 0 tokenises the dataset and writes it as three flat arrays (``input_ids``, ``labels`` as int32, and the
examples' ``offsets``) under ``<cache_dir>/<key>/``, atomically; the other ranks wait at a barrier and
memory-map the same files (the page cache is shared, so N ranks on a node hold the tokens once).  The key is a
hash of the data config, the tokenizer (its class, vocabulary size and a hash of its full serialisation) and
the encoding's version, so a change to any of them gives a new entry.  A rank that cannot see rank 0's files
(a node-local cache directory on another node) tokenises for itself and says so.

``cache_dir``: ``data.cache_dir``, else ``$RECALL_DIST_CACHE``, else ``~/.cache/recall_dist``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recall_dist.configtree import to_dict
from recall_dist.data.config import DataConfig
from recall_dist.data.dataset import build_dataset
from recall_dist.io import fresh_dir, publish_dir, temp_sibling

logger = logging.getLogger(__name__)

ENCODING_VERSION = 2  # bump when tokenize_example's / tokenize_messages's output changes for the same inputs
COMPLETE = "COMPLETE"


def default_cache_dir() -> Path:
    """The root of recall_dist's caches (tokenised data here, converted models in ``convert.py``):
    ``$RECALL_DIST_CACHE``, or ``~/.cache/recall_dist`` when it is unset or empty; ``~`` is expanded.
    The one place that reads the variable."""
    return Path(os.environ.get("RECALL_DIST_CACHE") or "~/.cache/recall_dist").expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the class, the vocabulary, the special tokens and
    the chat template (which renders conversations)."""
    if hasattr(tokenizer, "backend_tokenizer"):  # a fast Hugging Face tokenizer: its full JSON
        body = tokenizer.backend_tokenizer.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        body = json.dumps(vars(tokenizer), sort_keys=True, default=str)
    specials = [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")]
    template = getattr(tokenizer, "chat_template", None)
    payload = f"{type(tokenizer).__name__}|{len(tokenizer)}|{specials}|{template}|{body}"
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer) -> str:
    data = to_dict(cfg)
    data.pop("cache_dir", None)
    data.pop("packing", None)  # packing happens in the batch iterator, after tokenisation
    payload = json.dumps({"data": data, "tokenizer": tokenizer_fingerprint(tokenizer), "v": ENCODING_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class TokenizedDataset(Sequence):
    """Examples ``{"input_ids": list[int], "labels": list[int]}`` read from memory-mapped flat arrays."""

    def __init__(self, directory: Path):
        self.input_ids = np.load(directory / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(directory / "labels.npy", mmap_mode="r")
        self.offsets = np.load(directory / "offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self.input_ids[start:stop].tolist(), "labels": self.labels[start:stop].tolist()}


def write_cache(examples: list[dict], directory: Path) -> None:
    """Write ``examples`` to ``directory`` atomically (a temporary sibling, then a rename)."""
    tmp = fresh_dir(temp_sibling(directory, per_process=True))
    lengths = [len(e["input_ids"]) for e in examples]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    for key in ("input_ids", "labels"):
        flat = np.fromiter((t for e in examples for t in e[key]), dtype=np.int64, count=int(offsets[-1]))
        if flat.size and (flat.min() < np.iinfo(np.int32).min or flat.max() > np.iinfo(np.int32).max):
            raise ValueError(f"token ids do not fit in int32 (range {flat.min()}..{flat.max()})")
        np.save(tmp / f"{key}.npy", flat.astype(np.int32))
    np.save(tmp / "offsets.npy", offsets)
    (tmp / COMPLETE).write_text(f"{len(examples)}\n")
    # The first writer wins (another rank or job may publish the same key: keep theirs).  No fsync, as
    # before: the entry is derived data written on every cold start, and the tokens can be gigabytes.
    publish_dir(tmp, directory, replace=False, fsync=False)


def load_dataset(cfg: DataConfig, tokenizer, rank: int = 0, barrier=None) -> Sequence[dict]:
    """The tokenised examples of ``cfg``: built once by rank 0 and cached, then shared through the cache.
    ``barrier`` (callable, collective) separates rank 0's write from the others' read; None: one process."""
    directory = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    directory = directory / "tokenized" / cache_key(cfg, tokenizer)
    if rank == 0 and not (directory / COMPLETE).is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        write_cache(build_dataset(cfg, tokenizer), directory)
    if barrier is not None:
        barrier()
    if not (directory / COMPLETE).is_file():
        logger.warning("rank %d: no tokenised cache at %s (node-local cache dir?): tokenising here", rank, directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        write_cache(build_dataset(cfg, tokenizer), directory)
    return TokenizedDataset(directory)
