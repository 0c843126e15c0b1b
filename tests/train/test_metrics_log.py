"""recall_dist/train/metrics_log.py without a training run: one JSON line per logged step, read back by
``json`` and by ``read_metrics``; a resume drops the lines after the resumed step; a step with non-finite
tokens is logged as NaN, never 0.0; a disabled logger (ranks other than 0) writes nothing.  Under real
runs: tests/e2e/test_resume.py, tests/e2e/test_nothing_lost.py (divergence)."""

from __future__ import annotations

import json
import math

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
