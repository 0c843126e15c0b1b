"""Shard keys: a model retrained or overwritten at the same path is evaluated again, an unchanged
one (even moved) is reused; the content fingerprint itself; work items and their shards."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from recall_dist.configtree import from_dict
from recall_dist.data import CharTokenizer, build_task
from recall_dist.eval import SweepConfig, aggregate, compute_shard, work_items
from recall_dist.eval.content_hash import directory_fingerprint
from recall_dist.eval.shards import shard_items, shard_path
from tests.eval.models import random_llama, save

TOKENIZER = CharTokenizer(build_task("product", max_factor=4).alphabet)


def _config(model_dir, output_dir, **extra) -> SweepConfig:
    return from_dict(
        SweepConfig,
        {
            "models": [{"name": "m", "path": str(model_dir)}],
            "task": "product",
            "task_params": {"max_factor": 4},
            "temperatures": [0.7, 1.3],
            "num_samples": 0,
            "recall_at_n": 5,
            "output_dir": str(output_dir),
            **extra,
        },
    )


def _sweep(cfg) -> tuple[list, int]:
    """(table rows, mtime of the shard file) of a one-shard sweep."""
    path = compute_shard(cfg, 0, 1, progress=False)
    return aggregate(cfg, 1)["rows"], path.stat().st_mtime_ns


@pytest.mark.parametrize("mode", ["content", "stat"])
def test_retrained_model_is_recomputed_unchanged_is_reused(tmp_path, mode):
    model_dir = save(random_llama(TOKENIZER.vocab_size, 0), TOKENIZER, tmp_path / "model")
    cfg = _config(model_dir, tmp_path / "out", model_fingerprint=mode)
    first, mtime = _sweep(cfg)
    assert _sweep(cfg) == (first, mtime)  # unchanged: the shard file is reused as is

    # "Retrain" at the same path: same architecture, same file names and sizes, other weights.
    shutil.rmtree(model_dir)
    save(random_llama(TOKENIZER.vocab_size, 1), TOKENIZER, model_dir)
    second, mtime2 = _sweep(cfg)
    assert mtime2 != mtime and second != first
    fresh, _ = _sweep(_config(model_dir, tmp_path / "fresh", model_fingerprint=mode))
    assert second == fresh  # the numbers of the new model, not the stale ones


def test_moved_model_is_reused_by_content(tmp_path):
    model_dir = save(random_llama(TOKENIZER.vocab_size, 0), TOKENIZER, tmp_path / "model")
    first, mtime = _sweep(_config(model_dir, tmp_path / "out"))
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dir, moved)  # new mtimes, same bytes
    assert _sweep(_config(moved, tmp_path / "out")) == (first, mtime)


def test_directory_fingerprint(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "config.json").write_text('{"x": 1}')
    (a / "sub" / "w.bin").write_bytes(bytes(range(256)) * 64)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert directory_fingerprint(a) == directory_fingerprint(b)  # content, not path or mtime
    data = bytearray((b / "sub" / "w.bin").read_bytes())
    data[1000] ^= 1  # one flipped bit, same size
    (b / "sub" / "w.bin").write_bytes(bytes(data))
    assert directory_fingerprint(a) != directory_fingerprint(b)

    stat_before = directory_fingerprint(a, "stat")
    st = (a / "config.json").stat()
    os.utime(a / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert directory_fingerprint(a, "stat") != stat_before
    (a / "extra.txt").write_text("")  # a new file counts too
    assert directory_fingerprint(a) != directory_fingerprint(b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        directory_fingerprint(tmp_path / "missing")
    with pytest.raises(ValueError, match="allowed: content, stat"):
        directory_fingerprint(a, "mtime")


def test_work_items_and_shards(tmp_path):
    tokenizer = CharTokenizer(build_task("product_conditional").alphabet)
    model_dir = save(random_llama(tokenizer.vocab_size, 0), tokenizer, tmp_path / "model")
    cfg = from_dict(
        SweepConfig,
        {
            "models": [{"name": "a", "path": str(model_dir)}, {"name": "b", "path": str(model_dir)}],
            "task": "product_conditional",
            "task_params": {"max_factor": 3},
            "temperatures": [0.5, 1.0, 2.0],
            "num_samples": 0,
            "recall_at_n": 5,
            "output_dir": str(tmp_path / "out"),
        },
    )
    items = work_items(cfg)  # one item per (model, prompt): every temperature inside it
    assert [(i.model, i.prompt) for i in items] == [(m, f"{a}*") for m in "ab" for a in (1, 2, 3)]
    blocks = [shard_items(items, s, 4) for s in range(4)]
    assert [i for block in blocks for i in block] == items and [len(b) for b in blocks] == [1, 2, 1, 2]
    with pytest.raises(ValueError, match=r"must be in \[0, 4\)"):
        shard_items(items, 4, 4)
    path = compute_shard(cfg, 1, 4, progress=False)
    assert path == shard_path(cfg, 1, 4)
    records = json.loads(path.read_text())["records"]
    assert [len(r["temperatures"]) for r in records] == [3, 3]
