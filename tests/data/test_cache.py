"""The tokenised-dataset cache: the same examples as tokenising directly, written once by rank 0 and read
by the other ranks (which never tokenise), keyed by everything that changes the token ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from recall_dist.data import DataConfig, load_tokenizer
from recall_dist.data.cache import cache_key, load_dataset
from recall_dist.data.dataset import build_dataset
from recall_dist.data.tokenizer import CharTokenizer
from recall_dist.distributed.testing import run_distributed_test


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(task_params={"max_factor": 9}, num_samples=200, cache_dir=str(tmp_path / "cache"), **kw)


def test_cached_examples_equal_direct_tokenisation(tmp_path):
    cfg, tok = _cfg(tmp_path), load_tokenizer("char:product")
    direct = build_dataset(cfg, tok)
    cached = load_dataset(cfg, tok)
    assert len(cached) == len(direct) and [cached[i] for i in range(len(cached))] == direct
    assert cached[-1] == direct[-1]
    with pytest.raises(IndexError):
        cached[len(direct)]
    entries = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(entries) == 1 and (entries[0] / "COMPLETE").is_file()
    again = load_dataset(cfg, tok)  # reused, not rebuilt
    assert list((tmp_path / "cache" / "tokenized").iterdir()) == entries and again[3] == direct[3]


def test_key_follows_what_changes_the_ids(tmp_path):
    tok = load_tokenizer("char:product")
    base = cache_key(_cfg(tmp_path), tok)
    assert cache_key(_cfg(tmp_path, packing=True, max_length=64), tok) != base  # max_length truncates
    assert cache_key(_cfg(tmp_path, seed=1), tok) != base
    assert cache_key(_cfg(tmp_path), CharTokenizer("0123456789*= ")) != base
    assert cache_key(DataConfig(task_params={"max_factor": 9}, num_samples=200, cache_dir="/elsewhere"), tok) == base
    packed = DataConfig(task_params={"max_factor": 9}, num_samples=200, packing=True, max_length=64)
    assert cache_key(packed, tok) == cache_key(
        DataConfig(task_params={"max_factor": 9}, num_samples=200, max_length=64), tok
    )


def _rank_worker(cache_dir: str, result: str) -> None:
    import torch.distributed as dist

    import recall_dist.data.cache as cache

    if dist.get_rank() != 0:  # only rank 0 may tokenise
        cache.build_dataset = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rank 1 tokenised"))
    cfg = DataConfig(task_params={"max_factor": 9}, num_samples=300, cache_dir=cache_dir)
    data = cache.load_dataset(cfg, load_tokenizer("char:product"), dist.get_rank(), dist.barrier)
    Path(result, f"rank{dist.get_rank()}.txt").write_text(repr([data[i] for i in range(len(data))]))


def test_rank_zero_tokenises_the_others_read(tmp_path):
    run_distributed_test(_rank_worker, 2, str(tmp_path / "cache"), str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    expected = build_dataset(DataConfig(task_params={"max_factor": 9}, num_samples=300), load_tokenizer("char:product"))
    assert (tmp_path / "rank1.txt").read_text() == repr(expected)


@pytest.mark.parametrize("value", [None, "", "~/rd-cache", "/tmp/rd-cache"])
def test_one_reader_of_recall_dist_cache(monkeypatch, value):
    """``RECALL_DIST_CACHE`` is read by ``default_cache_dir`` alone: unset or empty means
    ``~/.cache/recall_dist``, ``~`` is expanded, and converted models live under the same root."""
    from recall_dist.convert import default_output_dir
    from recall_dist.data.cache import default_cache_dir

    if value is None:
        monkeypatch.delenv("RECALL_DIST_CACHE", raising=False)
    else:
        monkeypatch.setenv("RECALL_DIST_CACHE", value)
    expected = {None: Path.home() / ".cache" / "recall_dist", "": Path.home() / ".cache" / "recall_dist"}
    expected |= {"~/rd-cache": Path.home() / "rd-cache", "/tmp/rd-cache": Path("/tmp/rd-cache")}
    assert default_cache_dir() == expected[value]
    assert default_output_dir() == expected[value] / "models" / "smollm2-135m-instruct"
