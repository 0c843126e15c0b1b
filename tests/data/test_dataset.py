import json

import pytest

from recall_dist.configtree import ConfigError, from_dict
from recall_dist.data.config import DataConfig
from recall_dist.data.dataset import build_dataset, load_records, tokenize_example
from recall_dist.data.synthetic import build_task
from recall_dist.data.tokenizer import CharTokenizer, load_tokenizer


def reference_example(tok, prompt, completion):
    """Plain re-implementation: ids by alphabet position (+3), bos=1, eos=2."""
    p = [1] + [3 + tok.alphabet.index(c) for c in prompt]
    c = [3 + tok.alphabet.index(ch) for ch in completion] + [2]
    return {"input_ids": p + c, "labels": [-100] * len(p) + c}


def test_synthetic_dataset_masks_the_prompt():
    cfg = DataConfig(source="synthetic:product_conditional", task_params={"max_factor": 7}, num_samples=200, seed=5)
    tok = load_tokenizer("char:product_conditional")
    records = build_task("product_conditional", max_factor=7).sample(200, seed=5)
    examples = build_dataset(cfg, tok)
    assert examples == [reference_example(tok, r["prompt"], r["completion"]) for r in records]
    assert cfg.task().target_distribution("3*")["21"] == pytest.approx(1 / 7)


def test_truncation_semantics():
    tok = CharTokenizer("abcdef")
    full = tokenize_example("ab", "cde", tok)  # [bos a b c d e eos]
    assert full == {"input_ids": [1, 3, 4, 5, 6, 7, 2], "labels": [-100, -100, -100, 5, 6, 7, 2]}
    assert tokenize_example("ab", "cde", tok, max_length=7) == full
    # right: cut after max_length tokens, eos cut too
    assert tokenize_example("ab", "cde", tok, max_length=5) == {
        "input_ids": [1, 3, 4, 5, 6],
        "labels": [-100, -100, -100, 5, 6],
    }
    # nothing of the completion left: dropped
    assert tokenize_example("ab", "cde", tok, max_length=3) is None
    assert tokenize_example("ab", "cde", tok, max_length=6, truncation="drop") is None


def test_build_dataset_drops_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "a", "completion": "b" * n}) for n in [1, 5, 2]))
    tok = CharTokenizer("ab")
    kept = build_dataset(DataConfig(source=str(path), max_length=5, truncation="drop"), tok)
    assert [len(e["input_ids"]) for e in kept] == [4, 5]
    with pytest.raises(ValueError, match="no example left"):
        build_dataset(DataConfig(source=str(path), max_length=2), tok)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_files(tmp_path, fmt):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "other": i} for i in range(6)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DataConfig(source=str(path), prompt_field="question", completion_field="answer", num_samples=4)
    assert load_records(cfg) == [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    tok = CharTokenizer("qa0123456789")
    examples = build_dataset(cfg, tok)
    assert examples == [reference_example(tok, f"q{i}", f"a{i}") for i in range(4)]
    no_prompt = DataConfig(source=str(path), prompt_field="", completion_field="answer")
    assert [r["prompt"] for r in load_records(no_prompt)] == [""] * 6


def test_missing_file_and_field_are_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"^data.source: '.*nope.jsonl': file or directory not found"):
        load_records(DataConfig(source=str(missing)))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x", "text": "y"}))
    with pytest.raises(ConfigError, match=r"completion_field.*'completion'.*available columns: prompt, text"):
        load_records(DataConfig(source=str(path)))
    path.write_text(json.dumps({"prompt": "x", "completion": 3}))
    with pytest.raises(ConfigError, match=r"d\.jsonl, row 0: 'completion' is 3; expected a string"):
        load_records(DataConfig(source=str(path)))


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(ConfigError, match=r"^data.source: 'no-such-org/no-such-dataset-xyz'.*split 'train'"):
        load_records(DataConfig(source="no-such-org/no-such-dataset-xyz"))


def test_config_validation_names_key():
    cases = [
        ({"source": "synthetic:nope"}, "source: 'synthetic:nope'.*synthetic:product"),
        ({"source": "synthetic:product", "task_params": {"max_factor": 0}}, "task_params.*max_factor = 0"),
        ({"source": "synthetic:product", "task_params": {"size": 3}}, "task_params.*size: unknown parameter"),
        ({"source": "x.jsonl", "task_params": {"max_factor": 3}}, "task_params.*only apply"),
        ({"num_samples": 0}, "num_samples: 0"),
        ({"max_length": 1}, "max_length: 1"),
        ({"packing": True}, "packing: True.*needs max_length"),
        ({"truncation": "left"}, "truncation: 'left'.*right, drop"),
        ({"completion_field": ""}, "completion_field"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            from_dict(DataConfig, data)
    with pytest.raises(ConfigError, match=r"data.max_length: 1"):
        from_dict(DataConfig, {"max_length": 1}, "data")
    assert (
        from_dict(DataConfig, {"source": "synthetic:product", "task_params": {"max_factor": 4}}).task().max_factor == 4
    )


def test_hugging_face_tokenizer_uses_its_bos_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "what": 3, "is": 4, "six": 5, "times": 6, "seven": 7, "42": 8}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert tokenize_example("what is six times seven", "42", tok) == {
        "input_ids": [1, 3, 4, 5, 6, 7, 8, 2],
        "labels": [-100] * 6 + [8, 2],
    }
    no_bos_dir = tmp_path / "hf_no_bos"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(no_bos_dir)
    assert tokenize_example("six", "42", load_tokenizer(no_bos_dir)) == {"input_ids": [5, 8, 2], "labels": [-100, 8, 2]}
    no_eos_dir = tmp_path / "hf_no_eos"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(no_eos_dir)
    with pytest.raises(ValueError, match="no eos token"):
        tokenize_example("six", "42", load_tokenizer(no_eos_dir))
