"""recall_dist/data/validation.py: a bad local data file is reported with its file, line and what was
expected, and ``recall-dist train`` exits 2 before any process group exists (as rank 0 of 2 it would
otherwise wait for rank 1 at the rendezvous) and before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recall_dist.data.dataset import DataConfig
from recall_dist.data.validation import DataError, validate_data_source
from recall_dist.distributed.net import free_port
from tests.train.helpers import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
GOOD = '{"prompt": "3*4=", "completion": "12"}\n'


def _check(tmp_path: Path, name: str, content: str | bytes, **fields) -> None:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    validate_data_source(DataConfig(source=str(path), **fields))


@pytest.mark.parametrize(
    "content,message",
    [
        ("", r"no records \(the file is empty\)"),
        ("\n  \n", r"no records"),
        (GOOD + '{"prompt": "1*1=", "completion": "1"\n', r"line 2, column 37: not valid JSON .*expected one object"),
        (GOOD + '["1*1=", "1"]\n', r"line 2: expected a JSON object with string fields 'prompt' and 'completion'"),
        (GOOD + '{"prompt": "1*1="}\n', r"line 2: no 'completion' field .*this record has: 'prompt'"),
        (GOOD + '{"prompt": "1*1=", "completion": 1}\n', r"line 2: 'completion' is 1; expected a string"),
        (GOOD.encode() + b'{"prompt": "\xff"}\n', r"line 2: not UTF-8"),
    ],
    ids=["empty", "blank", "malformed", "not-object", "missing-field", "not-string", "not-utf8"],
)
def test_bad_jsonl_names_file_line_and_expectation(tmp_path, content, message):
    with pytest.raises(DataError, match=message) as info:
        _check(tmp_path, "train.jsonl", content)
    assert str(info.value).startswith(f"data.source: {tmp_path / 'train.jsonl'}")


def test_good_files_and_configured_fields_pass(tmp_path):
    _check(tmp_path, "ok.jsonl", GOOD + "\n" + GOOD)  # blank lines are skipped, as datasets does
    _check(tmp_path, "arr.json", "[" + GOOD.strip() + "]")
    _check(tmp_path, "text.jsonl", '{"text": "hello"}\n', prompt_field="", completion_field="text")
    with pytest.raises(DataError, match=r"record 0: no 'completion' field"):
        _check(tmp_path, "bad.json", '[{"prompt": "a"}]')


def test_parquet_columns_are_checked(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "completion": [3]}), path)
    with pytest.raises(DataError, match="column 'completion' has type int64; expected strings"):
        validate_data_source(DataConfig(source=str(path)))
    pq.write_table(pa.table({"prompt": ["a"]}), path)
    with pytest.raises(DataError, match="no column 'completion'"):
        validate_data_source(DataConfig(source=str(path)))
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        validate_data_source(DataConfig(source=str(path)))


@pytest.mark.slow
def test_train_exits_2_naming_the_line_before_any_process_group(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD * 3 + '{"prompt": "2*2=", "completion": 4}\n')
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config_dict(out, data={"source": str(data), "task_params": {}, "num_samples": None}))
    )
    # Rank 0 of 2 with no rank 1: a process group started first would wait at the rendezvous (timeout).
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "recall_dist", "train", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data error: data.source: {data}, line 4: 'completion' is 4; expected a string" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "something was written"
