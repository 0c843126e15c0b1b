"""recall_dist/data/validation.py: bad local data (files, folders, save_to_disk folders; chat,
prompt/completion, CSV, text) is reported with its file, line and what was expected, and ``recall-dist
train`` exits 2 with one line before any process group exists (as rank 0 of 2 it would otherwise wait
for rank 1 at the rendezvous) and before anything is written -- for each bad input of a new user's
first run (chat data without a chat template, a misspelled local model path, a missing CSV, ...)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recall_dist.configtree import ConfigError
from recall_dist.data.config import DataConfig
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


def _train_as_rank0_of_2(config: dict, tmp_path: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``recall-dist train`` as rank 0 of 2 with no rank 1: a process group started before the
    checks would wait at the rendezvous (and time out) instead of exiting 2."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    return subprocess.run(
        [sys.executable, "-m", "recall_dist", "train", str(path)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_train_exits_2_naming_the_line_before_any_process_group(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD * 3 + '{"prompt": "2*2=", "completion": 4}\n')
    out = tmp_path / "run"
    proc = _train_as_rank0_of_2(
        tiny_config_dict(out, data={"source": str(data), "task_params": {}, "num_samples": None}), tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data error: data.source: {data}, line 4: 'completion' is 4; expected a string" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "something was written"


CHAT = '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}\n'


@pytest.mark.parametrize(
    "content,message",
    [
        (
            CHAT + '{"prompt": "1*1=", "completion": "1"}\n',
            r"line 2: no 'messages' field \(data.messages_field\); "
            r"expected a JSON object with a 'messages' list .*; this record has: 'prompt', 'completion'",
        ),
        (CHAT + '{"messages": "hi"}\n', r"line 2: 'messages': expected a non-empty list"),
        (CHAT + '{"messages": [{"role": "user"}]}\n', r"line 2: 'messages'\[0\]: 'content' is None; expected a string"),
        (CHAT + '{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 2: 'messages' has no assistant turn"),
        (
            '{"question": "q", "answer": "a"}\n',
            r"line 1: no column for any data form: chat 'messages'.*"
            r"its columns: question, answer \(set data.prompt_field/completion_field to yours\)",
        ),
        (
            '{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}]}\n',
            r"line 1: 'completion' has no assistant turn",
        ),
    ],
    ids=["chat-then-pair", "not-a-list", "no-content", "no-assistant", "no-form", "completion-no-assistant"],
)
def test_bad_chat_jsonl_names_file_line_and_expectation(tmp_path, content, message):
    with pytest.raises(DataError, match=message) as info:
        _check(tmp_path, "chat.jsonl", content)
    assert str(info.value).startswith(f"data.source: {tmp_path / 'chat.jsonl'}, line ")
    assert "\n" not in str(info.value)


def test_good_chat_and_conversational_files_pass(tmp_path):
    _check(tmp_path, "chat.jsonl", CHAT * 2)
    pair = '{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}'
    _check(tmp_path, "conv.json", f"[{pair}]")
    _check(tmp_path, "text.jsonl", '{"text": "plain text"}\n')  # TRL's language-modelling form


def test_chat_data_needs_a_tokenizer_with_a_template(tmp_path):
    from tests.data.chat_tokenizer import chatml_tokenizer

    (tmp_path / "chat.jsonl").write_text(CHAT)
    cfg = DataConfig(source=str(tmp_path / "chat.jsonl"))
    validate_data_source(cfg, chatml_tokenizer())
    with pytest.raises(ConfigError, match=r"^data.chat_template: chat data .* set data.chat_template"):
        validate_data_source(cfg, chatml_tokenizer(template=None))
    pairs = DataConfig(source=str(_write(tmp_path, "pc.jsonl", GOOD)))
    validate_data_source(pairs, chatml_tokenizer(template=None))  # prompt/completion needs no template


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def test_csv_and_txt_files_are_checked(tmp_path):
    validate_data_source(DataConfig(source=str(_write(tmp_path, "ok.csv", "prompt,completion\n1*2=,2\n"))))
    with pytest.raises(DataError, match=r"short.csv, line 3: 'completion' is None; expected a string"):
        validate_data_source(DataConfig(source=str(_write(tmp_path, "short.csv", "prompt,completion\na,b\nc\n"))))
    with pytest.raises(DataError, match=r"cols.csv: no column for any data form.*its columns: q, a"):
        validate_data_source(DataConfig(source=str(_write(tmp_path, "cols.csv", "q,a\n1,2\n"))))
    with pytest.raises(DataError, match=r"chat.csv, line 2: 'messages': expected a non-empty list"):
        validate_data_source(DataConfig(source=str(_write(tmp_path, "chat.csv", 'messages\n"[{}]"\n'))))
    validate_data_source(DataConfig(source=str(_write(tmp_path, "corpus.txt", "some text\n\nmore\n"))))
    with pytest.raises(DataError, match=r"blank.txt: no records \(only blank lines or rows\)"):
        validate_data_source(DataConfig(source=str(_write(tmp_path, "blank.txt", "\n \n"))))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"latin1.txt, line 1: not UTF-8 text"):
        validate_data_source(DataConfig(source=str(tmp_path / "latin1.txt")))


def test_save_to_disk_and_folders_are_checked(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "saved"))
    validate_data_source(DataConfig(source=str(tmp_path / "saved")))
    with pytest.raises(DataError, match=r"saved \(split 'test'\), row 1: 'completion' is None; expected a string"):
        validate_data_source(DataConfig(source=str(tmp_path / "saved"), eval_split="test"))
    with pytest.raises(ConfigError, match=r"^data.split: 'valid': .* has no such split; its splits: train, test$"):
        validate_data_source(DataConfig(source=str(tmp_path / "saved"), split="valid"))
    datasets.Dataset.from_list([{"prompt": "a", "completion": 1}]).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(
        DataError, match=r"ints \(split 'train'\): column 'completion' has type int64; expected strings"
    ):
        validate_data_source(DataConfig(source=str(tmp_path / "ints")))
    _write(tmp_path, "folder/train.jsonl", GOOD)
    _write(tmp_path, "folder/test.jsonl", GOOD + '{"prompt": 1, "completion": "1"}\n')
    validate_data_source(DataConfig(source=str(tmp_path / "folder")))
    with pytest.raises(DataError, match=r"^data.source: .*folder/test.jsonl, line 2: 'prompt' is 1; expected a string"):
        validate_data_source(DataConfig(source=str(tmp_path / "folder"), eval_split="test"))


def test_validation_set_errors_name_its_keys(tmp_path):
    train = _write(tmp_path, "train.jsonl", GOOD * 4)
    bad = _write(tmp_path, "val.jsonl", GOOD + "{oops\n")
    with pytest.raises(DataError, match=r"^data.eval_source: .*val.jsonl, line 2, column 2: not valid JSON"):
        validate_data_source(DataConfig(source=str(train), eval_source=str(bad)))
    with pytest.raises(ConfigError, match=r"^data.eval_source: '.*nope.jsonl': file or directory not found"):
        validate_data_source(DataConfig(source=str(train), eval_source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"^data.split: 'train\[:10%\]' keeps none of the 4 records"):
        validate_data_source(DataConfig(source=str(train), split="train[:10%]"))
    validate_data_source(DataConfig(source=str(train), split="train[:50%]", eval_split="train[50%:]"))


def _user_data(root: Path) -> dict[str, Path]:
    """A new user's files: chat data, a tokenizer with and without a chat template, a saved DatasetDict."""
    import datasets

    from tests.data.chat_tokenizer import save_chatml_tokenizer

    chat = _write(root, "data/chat.jsonl", CHAT * 4)
    no_answer = '{"messages": [{"role": "user", "content": "hi"}]}\n'
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"text": "a"}]), "test": datasets.Dataset.from_list([{"text": "b"}])}
    ).save_to_disk(str(root / "data" / "saved"))
    (root / "models").mkdir()
    return {
        "chat": chat,
        "eval": _write(root, "data/eval.jsonl", CHAT + no_answer),
        "saved": root / "data" / "saved",
        "tokenizer": save_chatml_tokenizer(root / "tokenizer"),
        "bare_tokenizer": save_chatml_tokenizer(root / "bare_tokenizer", template=None),
    }


def _chat_config(files: dict[str, Path], out: Path, model: dict | None = None, tokenizer: str = "tokenizer", **data):
    """The tiny Llama (random init, the chat tokenizer's vocabulary) on ``files["chat"]``; ``model``
    replaces it, ``tokenizer`` picks ``files[tokenizer]``, ``data`` overrides data keys."""
    from tests.data.chat_tokenizer import chatml_tokenizer

    preset = yaml.safe_load((REPO / "recall_dist/presets/models/tiny-llama.yaml").read_text())["config"]
    model = model or {
        "config": {**preset, "vocab_size": len(chatml_tokenizer())},
        "tokenizer": str(files[tokenizer]),
    }
    config = tiny_config_dict(out, model=model, data={"source": str(files["chat"]), "task_params": {}, **data})
    config["data"].update(num_samples=None, cache_dir=str(out.parent / "cache"))
    return config


# Each bad input of a new user's first run: (what they did, the one line they get).
BAD_INPUTS = {
    "chat-data-tokenizer-without-template": (
        lambda f, out: _chat_config(f, out, tokenizer="bare_tokenizer"),
        r"config error: data.chat_template: chat data \('messages'\) needs a chat template, and tokenizer .* "
        r"has none: set data.chat_template to a Jinja template string or a .jinja file",
    ),
    "misspelled-local-model-path": (
        lambda f, out: _chat_config(f, out, {"name_or_path": "models/tiny-modle"}),
        r"config error: model.name_or_path: 'models/tiny-modle': no such local directory",
    ),
    "missing-csv": (
        lambda f, out: _chat_config(f, out, source="data/pc.csv"),
        r"config error: data.source: 'data/pc.csv': file or directory not found",
    ),
    "eval-row-without-assistant": (
        lambda f, out: _chat_config(f, out, eval_source="data/eval.jsonl"),
        r"data error: data.eval_source: data/eval.jsonl, line 2: 'messages' has no assistant turn",
    ),
    "save-to-disk-missing-split": (
        lambda f, out: _chat_config(f, out, source="data/saved", split="validation"),
        r"config error: data.split: 'validation': 'data/saved' has no such split; its splits: train, test",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_new_users_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, case):
    files = _user_data(tmp_path)
    make_config, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    proc = _train_as_rank0_of_2(make_config(files, out), tmp_path, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("recall-dist train: ")]
    assert len(ours) == 1 and re.search(message, ours[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "huggingface.co" not in proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists(), "something was written"
