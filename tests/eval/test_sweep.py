"""The sweep end to end on tiny real Llamas: identical tables on 1 and 2 gloo processes, resumable
shards, the CLI, and config errors that name the key."""

import json
import os

import pytest

from recall_dist.configtree import ConfigError, from_dict
from recall_dist.data import CharTokenizer, build_task
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.eval import SweepConfig, aggregate, compute_shard, run_sweep, work_items
from recall_dist.eval.cli import main
from recall_dist.eval.sweep import shard_path
from tests.eval.models import random_llama, save

TASK = {"task": "product_conditional", "task_params": {"max_factor": 3}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = CharTokenizer(build_task("product_conditional", max_factor=3).alphabet)
    return {
        name: str(save(random_llama(tok.vocab_size, seed), tok, root / name))
        for name, seed in (("nll", 0), ("cdiv", 1))
    }


def _config(checkpoints, output_dir, **extra) -> dict:
    return {
        "models": [{"name": n, "path": p} for n, p in checkpoints.items()],
        **TASK,
        "temperatures": [0.5, 1.0, 2.0],
        "num_samples": 24,
        "generate_batch_size": 10,
        "score_batch_size": 7,
        "output_dir": str(output_dir),
        **extra,
    }


def _sweep_on_every_rank(cfg_dict):
    run_sweep(from_dict(SweepConfig, cfg_dict))


@pytest.mark.slow
def test_one_and_two_processes_give_identical_tables(checkpoints, tmp_path):
    outputs = {}
    for world in (1, 2):
        cfg = _config(checkpoints, tmp_path / f"world{world}")
        run_distributed_test(_sweep_on_every_rank, world, cfg)
        shards = sorted(os.listdir(tmp_path / f"world{world}" / "shards"))
        assert len(shards) == world
        outputs[world] = {name: (tmp_path / f"world{world}" / name).read_text() for name in ("sweep.csv", "sweep.json")}
    assert outputs[1] == outputs[2]
    result = json.loads(outputs[1]["sweep.json"])
    assert len(result["rows"]) == 2 * 3 and {r["num_prompts"] for r in result["rows"]} == {3}
    for r in result["rows"]:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert abs(r["precision_sampled"] - r["precision"]) < 4 * r["precision_sampled_se"] + 1e-9


def test_shards_are_resumed_and_recomputed_on_config_change(checkpoints, tmp_path):
    cfg = from_dict(SweepConfig, _config(checkpoints, tmp_path, num_samples=0, recall_at_n=10, temperatures=[1.0]))
    assert len(work_items(cfg)) == 2 * 3
    paths = [compute_shard(cfg, s, 4, progress=False) for s in range(4)]  # 6 items over 4 shards
    assert sum(len(json.loads(p.read_text())["records"]) for p in paths) == 6
    mtime = paths[0].stat().st_mtime_ns
    assert compute_shard(cfg, 0, 4) == paths[0] and paths[0].stat().st_mtime_ns == mtime  # skipped
    first = aggregate(cfg, 4)
    changed = from_dict(SweepConfig, _config(checkpoints, tmp_path, num_samples=0, recall_at_n=20, temperatures=[1.0]))
    with pytest.raises(FileNotFoundError, match="another config"):
        aggregate(changed, 4)
    compute_shard(changed, 0, 4)
    assert paths[0].stat().st_mtime_ns != mtime
    for s in range(1, 4):
        compute_shard(changed, s, 4)
    second = aggregate(changed, 4)
    for a, b in zip(first["rows"], second["rows"], strict=False):  # precision does not depend on N, Recall@N grows
        assert a["precision"] == b["precision"] and b["recall"] > a["recall"]
    assert shard_path(cfg, 0, 4).name == "shard-00000-of-00004.json"


def test_cli_writes_table_and_plot(checkpoints, tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(checkpoints, tmp_path / "out", num_samples=12)))
    assert main([str(cfg_path), "temperatures=[0.7,1.0,1.5]", "min_precision=0.01"]) == 0
    out = capsys.readouterr().out
    assert "max recall" in out and "nll" in out and "cdiv" in out
    header = (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0]
    assert header.startswith("model,temperature,precision,recall,recall_at_n,precision_sampled")
    assert (tmp_path / "out" / "pr_curve.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())["summary"]
    assert set(summary) == {"nll", "cdiv"} and all(s["max_recall"] >= 0 for s in summary.values())


def test_cli_single_shards_then_aggregate(checkpoints, tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "sweep.yaml"
    cfg_path.write_text(
        yaml.safe_dump(_config(checkpoints, tmp_path / "out", num_samples=0, recall_at_n=5, temperatures=[1.0, 2.0]))
    )
    assert main([str(cfg_path), "--aggregate-only", "--num-shards", "3"]) == 1
    assert "3 of 3 shards missing" in capsys.readouterr().err
    for shard in (2, 0, 1):  # any order, e.g. a Slurm job array
        assert main([str(cfg_path), "--shard", str(shard), "--num-shards", "3"]) == 0
    assert main([str(cfg_path), "--aggregate-only", "--num-shards", "3"]) == 0
    assert len((tmp_path / "out" / "sweep.csv").read_text().splitlines()) == 1 + 2 * 2
    assert main([str(cfg_path), "--shard", "0"]) == 2 and "--num-shards" in capsys.readouterr().err


def test_config_errors_name_the_key(checkpoints, tmp_path, capsys):
    good = _config(checkpoints, tmp_path)
    cases = [
        ({"models": [{"name": "x", "path": str(tmp_path / "missing")}]}, r"models\[0\]\.path.*does not exist"),
        ({"temperatures": []}, r"temperatures.*empty"),
        ({"temperatures": [1.0, 0.0]}, r"temperatures\[1\].*> 0"),
        ({"temperatures": [1.0, -0.5]}, r"temperatures\[1\].*> 0"),
        ({"num_samples": 0}, r"recall_at_n.*required"),
        ({"task": "nope"}, r"task.*unknown synthetic task"),
        ({"metric": "bleu"}, r"metric.*allowed: known_support, text"),
        ({"models": []}, r"models.*at least one"),
    ]
    for change, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            from_dict(SweepConfig, {**good, **change})
    import yaml

    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(good))
    assert main([str(cfg_path), "temperatures=[]"]) == 2
    assert "temperatures" in capsys.readouterr().err


def test_interrupted_sweep_resumes_to_identical_tables(checkpoints, tmp_path):
    """Shards left by an interrupted run are reused, and the tables are byte-identical to an
    uninterrupted run's."""
    fresh = from_dict(SweepConfig, _config(checkpoints, tmp_path / "fresh", num_shards=3))
    run_sweep(fresh, rank=0, world_size=1)
    resumed = from_dict(SweepConfig, _config(checkpoints, tmp_path / "resumed", num_shards=3))
    kept = compute_shard(resumed, 1, 3, progress=False)  # the run "died" after this shard
    mtime = kept.stat().st_mtime_ns
    run_sweep(resumed, rank=0, world_size=1)
    assert kept.stat().st_mtime_ns == mtime
    for name in ("sweep.csv", "sweep.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
