"""recall_dist/train/metrics_log.py without a training run: one JSON line per logged step, read back by
``json`` and by ``read_metrics``; a resume drops the lines after the resumed step; a step with non-finite
tokens is logged as NaN, never 0.0; a disabled logger (ranks other than 0) writes nothing.  Under real
runs: tests/e2e/test_resume.py, tests/e2e/test_nothing_lost.py (divergence)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recall_dist.train.metrics_log import MetricsLogger, _tensorboard_tag, mark_nonfinite, nonfinite_step, read_metrics


def test_one_json_line_per_step_and_a_resume_drops_the_later_ones(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=True)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "tokens": 10 * step})
    logger.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": s, "loss": 1.0 / s, "tokens": 10 * s} for s in range(1, 6)]

    resumed = MetricsLogger(tmp_path / "run", enabled=True)
    resumed.truncate_after(3)  # the checkpoint was at step 3: steps 4 and 5 are logged again
    resumed.log(4, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "run")[3] == {"step": 4, "loss": 0.5}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]  # no temporary file left
    MetricsLogger(tmp_path / "fresh", enabled=True).truncate_after(3)  # nothing to truncate yet
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_a_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_read_metrics_skips_blank_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n  \n{"step": 2}\n')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_a_nonfinite_step_is_logged_as_nan(tmp_path):
    skipped = {"loss": 0.0, "nll": 0.0, "divergence": 0.0, "nonfinite_tokens": 3.0, "tokens": 40.0}
    assert nonfinite_step(skipped)
    marked = mark_nonfinite(dict(skipped))
    assert all(math.isnan(marked[k]) for k in ("loss", "nll", "divergence"))
    assert marked["tokens"] == 40.0 and marked["nonfinite_tokens"] == 3.0
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log(7, marked)
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["loss"]) and record["loss"] != 0.0

    fine = {"loss": 2.0, "nonfinite_tokens": 0.0, "grad_norm": 1.5}
    assert not nonfinite_step(fine) and mark_nonfinite(dict(fine)) == fine
    assert nonfinite_step({"loss": float("inf")})
    assert nonfinite_step({"loss": 1.0, "grad_norm": float("nan")})
    assert not nonfinite_step({"loss": 1.0})  # no gradient norm reported: only the loss counts


@pytest.mark.parametrize(
    "key,tag",
    [("loss", "train/loss"), ("eval_loss", "eval/loss"), ("eval_tokens", "eval/tokens"), ("tau", "train/tau")],
)
def test_tensorboard_tags(key, tag):
    assert _tensorboard_tag(key) == tag


def test_throughput_divides_the_steps_token_counts_by_its_wall_time():
    from recall_dist.train.metrics_log import throughput

    got = throughput({"tokens": 300.0, "input_tokens": 480.0}, 1.5)
    assert got == {
        "step_seconds": 1.5,
        "trained_tokens_per_s": 200.0,
        "input_tokens_per_s": 320.0,
        "tokens_per_s": 320.0,  # the earlier name of input_tokens_per_s
    }


def test_the_progress_line_shows_the_weight_diagnostics():
    from recall_dist.train.metrics_log import progress_fields

    stats = {"loss": 1.23456, "lr": 2e-5, "ess_fraction": 0.1234, "weight_max_over_mean": 36.4, "top1pct_share": 0.2}
    assert progress_fields(stats, {"eval_loss": "1.5000"}) == {
        "loss": "1.2346",
        "lr": "2.00e-05",
        "ess/tok": "0.123",
        "wmax/mean": "36.4",
        "top1%": "0.200",
        "eval_loss": "1.5000",
    }
    assert progress_fields({"loss": 1.0, "lr": 1.0}, {}) == {"loss": "1.0000", "lr": "1.00e+00"}


def _ess_step(ess_fraction: float, **extra) -> dict[str, float]:
    return {"loss": 1.0, "ess_fraction": ess_fraction, "weight_max_over_mean": 40.0, "top1pct_share": 0.3} | extra


def test_the_low_ess_warning_fires_after_k_low_steps_and_not_before(capsys):
    from recall_dist.train.metrics_log import LowEssWarning

    warning = LowEssWarning(0.05, 3)
    fired = [warning.update(step, _ess_step(0.01)) for step in range(1, 3)]
    assert fired == [False, False] and capsys.readouterr().err == ""
    assert warning.update(3, _ess_step(0.049))  # the third low step in a row
    err = capsys.readouterr().err
    assert "WARNING: ESS / tokens has been under 0.05 for 3 steps in a row (step 3: 0.0490" in err
    for key in ("loss.params.max_weight", "loss.params.nll_mix", "loss.params.alpha", "optim.lr"):
        assert key in err, key
    assert [warning.update(step, _ess_step(0.01)) for step in (4, 5, 6)] == [False, False, True]  # every K more
    capsys.readouterr()
    # A step at the threshold starts the count over; a skipped step neither counts nor resets it.
    assert not warning.update(7, _ess_step(0.05))
    assert [warning.update(step, _ess_step(0.01)) for step in (8, 9)] == [False, False]
    assert not warning.update(10, _ess_step(0.01, loss=float("nan"), nonfinite_tokens=1.0))
    assert warning.update(11, _ess_step(0.01))
    assert "(step 11: 0.0100" in capsys.readouterr().err
    quiet = LowEssWarning(0.05, 3, enabled=False)  # ranks other than 0 count but never print
    assert not any(quiet.update(step, _ess_step(0.0)) for step in range(1, 10))
    never = LowEssWarning(0.0, 1)  # threshold 0: no warning
    assert not any(never.update(step, _ess_step(0.0)) for step in range(1, 10))
    assert "WARNING" not in capsys.readouterr().err


def _token_count_worker(result_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step
    from tests.train.helpers import build, tiny_config_dict

    ctx = init_distributed()
    cfg = build(
        tiny_config_dict(
            Path(result_dir) / "run",
            backend={"name": "fsdp2"},
            train={"micro_batch_size": 4, "global_batch_size": 16},  # 2 ranks x 2 micro-batches of 4
        )
    )
    run = setup(cfg, validate_resources(cfg), ctx)
    assert run.accumulation_steps == 2
    data = endless(run.batches)
    micro = [next(data) for _ in range(run.accumulation_steps)]
    # The naive counts: every target after the first position that is not ignored; every unpadded input token.
    trained = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    inputs = sum(int(b["attention_mask"].sum()) for b in micro)
    stats = train_step(run, iter(micro))
    torch.save({"trained": trained, "inputs": inputs, "stats": stats}, Path(result_dir, f"rank{dist.get_rank()}.pt"))


@pytest.mark.slow
def test_trained_and_input_tokens_of_a_step_equal_a_naive_count_over_all_ranks(tmp_path):
    import torch

    from recall_dist.distributed.testing import run_distributed_test
    from recall_dist.train.metrics_log import throughput

    run_distributed_test(_token_count_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    trained, inputs = sum(r["trained"] for r in ranks), sum(r["inputs"] for r in ranks)
    assert 0 < trained < inputs
    for r in ranks:  # every rank reports the step's global counts
        assert r["stats"]["tokens"] == trained and r["stats"]["input_tokens"] == inputs
        rates = throughput(r["stats"], 2.0)
        assert rates["trained_tokens_per_s"] == trained / 2.0 and rates["input_tokens_per_s"] == inputs / 2.0


def test_each_start_writes_a_header_that_a_resume_keeps_or_drops(tmp_path):
    """A header opens each start of the run; ``read_metrics`` skips headers, ``read_headers`` lists them;
    a resume at step s keeps the steps up to s and the headers of starts before s."""
    from recall_dist.train.metrics_log import read_headers

    first = MetricsLogger(tmp_path, enabled=True)
    first.truncate_after(0)
    first.log_header(0, {"kernel": {"kernel": "torch"}})
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    crashed = MetricsLogger(tmp_path, enabled=True)  # resumed at 2, wrote step 3 again, died
    crashed.truncate_after(2)
    crashed.log_header(2, {"kernel": {"kernel": "auto"}})
    crashed.log(3, {"loss": 3.5})
    again = MetricsLogger(tmp_path, enabled=True)  # resumed at 2 again: the crashed start's header goes
    again.truncate_after(2)
    again.log_header(2, {"kernel": {"kernel": "triton"}})
    assert read_headers(tmp_path) == [
        {"start_step": 0, "kernel": {"kernel": "torch"}},
        {"start_step": 2, "kernel": {"kernel": "triton"}},
    ]
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    MetricsLogger(tmp_path / "off", enabled=False).log_header(0, {})
    assert not (tmp_path / "off").exists()
