"""recall_dist/data/sources.py and records.py: a user's data in the forms they have it (chat ``messages``
and prompt/completion in .jsonl/.json/.parquet/.csv/.txt files, folders, ``save_to_disk`` folders),
read by the real ``datasets`` library, split and sliced; a local-looking path that does not exist is
refused without any network attempt."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recall_dist.configtree import ConfigError, from_dict
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.chat import tokenize_messages
from recall_dist.data.config import DataConfig
from recall_dist.data.dataset import build_dataset, load_records
from recall_dist.data.sources import open_split, parse_split
from tests.data.chat_tokenizer import chatml_tokenizer

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "you are a helpful assistant"},
            {"role": "user", "content": f"what is {i} plus {i} ?"},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
    }
    for i in range(4)
]
PAIRS = [{"prompt": f"{i}*{i}=", "completion": f"{i * i}"} for i in range(4)]


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: what is local must stay local."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def write(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the file type of ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_chat_files_give_message_records(tmp_path, suffix, no_network):
    path = write(tmp_path / f"chat{suffix}", CHATS)
    assert load_records(DataConfig(source=str(path))) == CHATS


def test_chat_examples_train_the_assistant_turns_only(tmp_path, tok):
    two_turns = {
        "messages": [
            *CHATS[1]["messages"],
            {"role": "user", "content": "and 3 ?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    path = write(tmp_path / "chat.jsonl", [CHATS[0], two_turns])
    for turns in ("all", "last"):
        examples = build_dataset(DataConfig(source=str(path), assistant_turns=turns), tok)
        assert examples == [
            tokenize_messages(CHATS[0]["messages"], tok, assistant_turns=turns),
            tokenize_messages(two_turns["messages"], tok, assistant_turns=turns),
        ]
    labels = build_dataset(DataConfig(source=str(path), assistant_turns="last"), tok)[1]["labels"]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "6<|im_end|>"


def test_chat_data_without_a_template_names_data_chat_template(tmp_path):
    path = write(tmp_path / "chat.jsonl", CHATS)
    with pytest.raises(ConfigError, match=r"^data.chat_template: chat data .* set data.chat_template"):
        build_dataset(DataConfig(source=str(path)), chatml_tokenizer(template=None))


def test_trl_conversational_prompt_completion_trains_the_completion(tmp_path, tok):
    rows = [{"prompt": c["messages"][:2], "completion": c["messages"][2:]} for c in CHATS]
    path = write(tmp_path / "pc.parquet", rows)
    records = load_records(DataConfig(source=str(path)))
    assert records == [{"messages": c["messages"], "completion_start": 2} for c in CHATS]
    assert build_dataset(DataConfig(source=str(path)), tok) == [tokenize_messages(c["messages"], tok) for c in CHATS]


def test_csv_cells_stay_strings(tmp_path, no_network):
    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\n"3*4=",12\nsay nothing:,\n"a, b",007\n')
    assert load_records(DataConfig(source=str(path))) == [
        {"prompt": "3*4=", "completion": "12"},
        {"prompt": "say nothing:", "completion": ""},
        {"prompt": "a, b", "completion": "007"},
    ]


def test_txt_lines_are_text_records(tmp_path, no_network):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\n  \nsecond line\n")
    assert load_records(DataConfig(source=str(path))) == [
        {"prompt": "", "completion": "first line"},
        {"prompt": "", "completion": "second line"},
    ]
    jsonl = write(tmp_path / "text.jsonl", [{"text": "hello"}])  # TRL's language-modelling form
    assert load_records(DataConfig(source=str(jsonl))) == [{"prompt": "", "completion": "hello"}]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, no_network):
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
    assert load_records(DataConfig(source=str(tmp_path / "one"))) == PAIRS
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(CHATS), "test": datasets.Dataset.from_list(PAIRS)}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_records(DataConfig(source=str(tmp_path / "dict"))) == CHATS
    assert load_records(DataConfig(source=str(tmp_path / "dict"), split="test")) == PAIRS
    with pytest.raises(ConfigError, match=r"^data.split: 'validation': .* has no such split; its splits: train, test$"):
        load_records(DataConfig(source=str(tmp_path / "dict"), split="validation"))


def test_folder_of_files_splits_by_file_name(tmp_path, no_network):
    write(tmp_path / "named" / "train.jsonl", PAIRS[:3])
    write(tmp_path / "named" / "test.jsonl", PAIRS[3:])
    (tmp_path / "named" / "README.md").write_text("# my data\n")  # not data: ignored
    assert load_records(DataConfig(source=str(tmp_path / "named"))) == PAIRS[:3]
    assert load_records(DataConfig(source=str(tmp_path / "named"), split="test")) == PAIRS[3:]
    write(tmp_path / "parts" / "part-0.parquet", PAIRS[:2])
    write(tmp_path / "parts" / "part-1.parquet", PAIRS[2:])
    assert load_records(DataConfig(source=str(tmp_path / "parts"))) == PAIRS


def test_split_slices_partition_the_rows(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": str(i)} for i in range(10)])
    head = load_records(DataConfig(source=str(path), split="train[:75%]"))
    tail = load_records(DataConfig(source=str(path), split="train[75%:]"))
    assert [r["completion"] for r in head + tail] == [str(i) for i in range(10)] and len(head) == 8
    assert [r["completion"] for r in load_records(DataConfig(source=str(path), split="train[2:4]"))] == ["2", "3"]
    assert parse_split("test[-10%:]").rows(20) == range(18, 20)
    with pytest.raises(
        ConfigError, match=r"data.split: 'train\[:90\]%' is not allowed; a split name, optionally sliced"
    ):
        from_dict(DataConfig, {"split": "train[:90]%"}, "data")
    with pytest.raises(ConfigError, match=r"^data.split: 'test': .* its splits: train \(one file .* train\[:90%\]"):
        load_records(DataConfig(source=str(path), split="test"))


def test_validation_set_config_names_its_keys(tmp_path):
    path = write(tmp_path / "d.jsonl", PAIRS)
    cfg = DataConfig(source=str(path), split="train[:50%]", eval_split="train[50%:]", num_samples=1)
    held_out = cfg.eval_config()
    assert (held_out.source, held_out.split, held_out.num_samples, held_out.split_key) == (
        str(path),
        "train[50%:]",
        None,
        "data.eval_split",
    )
    assert load_records(held_out) == PAIRS[2:] and load_records(cfg) == PAIRS[:1]
    other = DataConfig(source=str(path), eval_source=str(tmp_path / "missing.jsonl")).eval_config()
    assert (other.split, other.source_key) == ("train", "data.eval_source")
    with pytest.raises(ConfigError, match=r"^data.eval_source: '.*missing.jsonl': file or directory not found"):
        load_records(other)
    assert DataConfig(source=str(path)).eval_config() is None
    with pytest.raises(ConfigError, match=r"^data.eval_split: 'test' is not allowed; null: a synthetic task has no"):
        from_dict(DataConfig, {"eval_split": "test"}, "data")


@pytest.mark.parametrize(
    "source,message",
    [
        ("data/pc.csv", r"^data.source: 'data/pc.csv': file or directory not found \(a local path"),
        ("data/typo", r"^data.source: 'data/typo': file or directory not found"),  # data/ is a local folder
        ("./chats", r"^data.source: './chats': file or directory not found"),
        ("chats.jsonl", r"^data.source: 'chats.jsonl': file or directory not found"),
        ("~/no-such-folder-xyz", r"^data.source: '~/no-such-folder-xyz': file or directory not found"),
    ],
)
def test_missing_local_paths_are_refused_without_the_network(tmp_path, monkeypatch, no_network, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=message):
        load_records(DataConfig(source=source))


def test_a_near_miss_of_a_local_data_file_is_a_typo(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "chats.jsonl", CHATS)
    for typo in ("chats", "chat.jsonl"):
        with pytest.raises(
            ConfigError, match=rf"^data.source: '{typo}': file or directory not found; did you mean 'chats.jsonl'\?"
        ):
            load_records(DataConfig(source=typo))
    assert load_records(DataConfig(source="chats.jsonl")) == CHATS


def test_unreadable_local_sources_are_named(tmp_path, no_network):
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(
        ConfigError, match=r"unsupported file type '.docx'; supported: .jsonl, .json, .parquet, .csv, .txt"
    ):
        open_split(str(tmp_path / "notes.docx"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"a folder with no data files .* and not a save_to_disk folder"):
        open_split(str(tmp_path / "empty"), "train")
    write(tmp_path / "mixed" / "a.jsonl", PAIRS)
    write(tmp_path / "mixed" / "b.parquet", PAIRS)
    with pytest.raises(ConfigError, match=r"mixes file types .jsonl, .parquet; keep one type per folder"):
        open_split(str(tmp_path / "mixed"), "train")


def test_forms_are_told_apart_by_their_columns(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"^data.source: '.*qa.jsonl': no column for any data form: chat 'messages'"):
        load_records(DataConfig(source=str(path)))
    assert load_records(DataConfig(source=str(path), prompt_field="question", completion_field="answer")) == [
        {"prompt": "q", "completion": "a"}
    ]
    no_prompt = from_dict(DataConfig, {"source": str(path), "prompt_field": None, "completion_field": "answer"}, "data")
    assert load_records(no_prompt) == [{"prompt": "", "completion": "a"}]
    with pytest.raises(ConfigError, match=r"^data.messages_field: 'conversation' is not a column of '.*qa.jsonl'"):
        load_records(DataConfig(source=str(path), messages_field="conversation"))
    renamed = write(tmp_path / "conv.jsonl", [{"conversation": CHATS[0]["messages"]}])
    assert load_records(DataConfig(source=str(renamed), messages_field="conversation")) == [CHATS[0]]


def test_bad_chat_rows_name_the_row(tmp_path):
    rows = [CHATS[0], {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ConfigError, match=r"bad.jsonl, row 1: 'messages' has no assistant turn.*roles: user"):
        load_records(DataConfig(source=str(write(tmp_path / "bad.jsonl", rows))))


def test_cwd_relative_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data" / "chat.jsonl", CHATS)
    assert load_records(DataConfig(source=os.path.join("data", "chat.jsonl"))) == CHATS
