"""The known-support sweep over a user's support file, on a tiny random Llama with a real ChatML tokenizer:
its Precision and Recall@N per prompt equal a teacher-forced computation written here with plain
transformers calls (``apply_chat_template``, ``model(input_ids).logits``, ``log_softmax``), identical
tables on 1, 2 and 3 gloo processes, and every error of a support file naming the line and the key."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recall_dist.configtree import ConfigError, from_dict
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.eval import SweepConfig, aggregate, compute_shard, run_sweep
from recall_dist.eval.cli import main as sweep_main
from recall_dist.eval.support_file import (
    SupportFile,
    encode_support,
    read_supports,
    write_support_file,
)
from recall_dist.eval.tasks import build_task
from tests.data.chat_tokenizer import CHATML, chatml_tokenizer
from tests.eval.models import random_llama

COLOURS = [{"role": "user", "content": "name a colour :"}]
SUM = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "two plus two ?"}]
ROWS = [
    {"messages": COLOURS, "completion": "red", "p": 0.5},
    {"messages": COLOURS, "completion": "green", "p": 0.3},
    {"messages": SUM, "completion": "four", "p": 0.9},
    {"messages": COLOURS, "completion": "blue yellow", "p": 0.2},
    {"messages": SUM, "completion": "4", "p": 0.1},
    {"prompt": "hello world ,", "completion": " fine thanks", "p": 0.25},
    {"prompt": "hello world ,", "completion": " how are you", "p": 0.75},
    {"prompt": [{"role": "user", "content": "three times three ?"}], "completion": "nine", "p": 1.0},
]
TEMPERATURES = [0.6, 1.0, 2.5]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECALL_N = 1000


def reference_ids(tokenizer, prompt, completion: str) -> tuple[list[int], int]:
    """(ids, number of prompt ids) that a ChatML chat model (or a plain prompt/completion pair) trains on,
    written out: the reply and its end token after the generation prompt."""
    if isinstance(prompt, list):
        head_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        head = tokenizer(head_text, add_special_tokens=False).input_ids
        ids = tokenizer(head_text + completion + "<|im_end|>", add_special_tokens=False).input_ids
        assert ids[: len(head)] == head
        return ids, len(head)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + tokenizer(prompt, add_special_tokens=False).input_ids
    return head + tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id], len(head)


def reference_metrics(model, tokenizer, rows, dtype) -> list[dict[str, tuple[float, float]]]:
    """Per temperature: prompt JSON -> (Precision, Recall@N) by the plain formulas, log Q_T(x) summed
    over the reply's tokens from one forward per sequence in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    by_prompt: dict[str, list] = {}
    for row in rows:
        prompt = row.get("messages", row.get("prompt"))
        ids, n_head = reference_ids(tokenizer, prompt, row["completion"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        log_q = [
            sum(torch.log_softmax(logits / t, dim=-1)[j - 1, ids[j]].item() for j in range(n_head, len(ids)))
            for t in TEMPERATURES
        ]
        by_prompt.setdefault(json.dumps(prompt), []).append((np.array(log_q), row["p"]))
    out = []
    for k in range(len(TEMPERATURES)):
        metrics = {}
        for key, support in by_prompt.items():
            q = np.exp([log_q[k] for log_q, _ in support])
            p = np.array([p for _, p in support])
            metrics[key] = (float(q.sum()), float(np.sum(p * -np.expm1(RECALL_N * np.log1p(-q)))))
        out.append(metrics)
    return out


def _fit(model, tokenizer, steps: int = 25):
    """A few Adam steps on the support rows (plain cross-entropy on the reply, one padded batch), so
    that Q_T puts real mass on the supports and the comparison is not between near-zero probabilities."""
    rows = [reference_ids(tokenizer, r.get("messages", r.get("prompt")), r["completion"]) for r in ROWS]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([[-100] * n + ids[n:] + [-100] * (width - len(ids)) for ids, n in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten()).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_models")
    tokenizer = chatml_tokenizer()
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = random_llama(len(tokenizer), seed)
        model = _fit(model.train(), tokenizer) if name == "a" else model  # "b": an untrained one
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def _config(model_dirs, support, output_dir, **extra) -> dict:
    return {
        "models": [{"name": n, "path": p} for n, p in model_dirs.items()],
        "support": str(support),
        "temperatures": TEMPERATURES,
        "num_samples": 0,
        "recall_at_n": RECALL_N,
        "score_batch_size": 2,  # ragged right-padded batches
        "output_dir": str(output_dir),
        **extra,
    }


def test_precision_and_recall_equal_plain_teacher_forcing(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    support = write_support_file(ROWS, tmp_path / "support.jsonl")
    cfg = from_dict(SweepConfig, _config({"a": model_dir["a"]}, support, tmp_path / "out"))
    compute_shard(cfg, 0, 1, progress=False)
    result = aggregate(cfg, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir["a"], dtype=torch.float32).eval()
    tokenizer = chatml_tokenizer()
    keys = list(SupportFile(support).supports)
    means = []
    # The same fp32 forward one sequence at a time: only the sweep's batching and padding differ; and in
    # float64: what fp32 rounding of the forward and the log-softmax costs.
    references = reference_metrics(model, tokenizer, ROWS, torch.float32)
    exacts = reference_metrics(model, tokenizer, ROWS, torch.float64)
    for t, expected, exact in zip(TEMPERATURES, references, exacts, strict=True):
        got = [r for r in result["prompt_rows"] if r["temperature"] == t]
        assert [r["prompt"] for r in got] == keys and len(got) == 4
        for row, (precision, recall), (precision64, recall64) in zip(
            got, expected.values(), exact.values(), strict=True
        ):
            assert row["precision"] == pytest.approx(precision, rel=1e-6, abs=0)
            assert row["recall"] == pytest.approx(recall, rel=1e-6, abs=0)
            assert row["precision"] == pytest.approx(precision64, rel=1e-5, abs=0)
            assert row["recall"] == pytest.approx(recall64, rel=1e-5, abs=0)
        (table,) = [r for r in result["rows"] if r["temperature"] == t]
        precisions = [p for p, _ in expected.values()]
        assert table["precision"] == pytest.approx(np.mean(precisions), rel=1e-6, abs=0)  # prompts weigh the same
        assert table["precision_std"] == pytest.approx(np.std(precisions), rel=1e-5, abs=0)
        assert table["precision_min"] == pytest.approx(min(precisions), rel=1e-6, abs=0)
        assert table["recall_max"] == pytest.approx(max(r for _, r in expected.values()), rel=1e-6, abs=0)
        assert table["num_prompts"] == 4
        means.append(table["precision"])
    assert max(means) > 0.3  # the comparison is not between near-zero probabilities
    with open(tmp_path / "out" / "sweep_prompts.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4 * len(TEMPERATURES)


@pytest.mark.slow  # generation with sampling
def test_shipped_config_and_example_run_through_the_cli(model_dir, tmp_path, capsys):
    """``recall-dist sweep configs/sweep_support.yaml`` on configs/support_example.jsonl (chat and prompt
    rows), with sampled estimates that agree with the exact numbers within their standard errors."""
    from recall_dist.eval.cli import main

    support = str(CONFIGS / "support_example.jsonl")
    overrides = [f"models=[{{name: a, path: {model_dir['a']}}}]", f"support={support}", f"output_dir={tmp_path}"]
    overrides += ["temperatures=[1.0]", "num_samples=60", "generate_batch_size=30"]
    assert main([str(CONFIGS / "sweep_support.yaml"), *overrides]) == 0
    assert "max recall" in capsys.readouterr().out
    with open(tmp_path / "sweep_prompts.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    saved = json.loads((tmp_path / "sweep.json").read_text())
    (row,) = saved["rows"]
    assert saved["support"] == support and row["num_prompts"] == 3
    assert abs(row["precision_sampled"] - row["precision"]) < 4 * row["precision_sampled_se"] + 1e-9
    assert abs(row["recall_sampled"] - row["recall_at_num_samples"]) < 4 * row["recall_sampled_se"] + 1e-9


def _sweep_on_every_rank(cfg_dict):
    run_sweep(from_dict(SweepConfig, cfg_dict))


@pytest.mark.slow
def test_tables_do_not_depend_on_the_number_of_ranks(model_dir, tmp_path):
    """8 work items (2 models x 4 prompts) on 1, 2 and 3 gloo ranks (3: an uneven split)."""
    support = write_support_file(ROWS, tmp_path / "support.jsonl")
    outputs = {}
    for world in (1, 2, 3):
        out = tmp_path / f"world{world}"
        run_distributed_test(_sweep_on_every_rank, world, _config(model_dir, support, out))
        outputs[world] = [(out / name).read_text() for name in ("sweep.csv", "sweep_prompts.csv", "sweep.json")]
    assert outputs[1] == outputs[2] == outputs[3]


# ---------------------------------------------------------------------------------------------
# Errors: each names the file, the line or prompt, and what is allowed.


def _write(tmp_path, rows, raw: str | None = None):
    path = tmp_path / "bad.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "q", "completion": "a"}], r"line 1: missing 'p'"),
        ([{"prompt": "q", "p": 1.0}], r"line 1: missing 'completion'"),
        ([{"completion": "a", "p": 1.0}], r"line 1: has neither of 'prompt' and 'messages'"),
        ([{"prompt": "q", "messages": COLOURS, "completion": "a", "p": 1.0}], r"has both"),
        ([{"prompt": "q", "completion": 3, "p": 1.0}], r"'completion' is 3; expected a string"),
        ([{"prompt": "q", "completion": "a", "p": 0}], r"'p' is 0; expected a number > 0"),
        ([{"prompt": "q", "completion": "a", "p": "1"}], r"'p' is '1'"),
        ([{"messages": [{"role": "user"}], "completion": "a", "p": 1.0}], r"'content' is None"),
        ([{"messages": [*COLOURS, {"role": "assistant", "content": "x"}], "completion": "a", "p": 1.0}], "ends with"),
        ([{"prompt": "q", "completion": "a", "p": 0.5}, {"prompt": "q", "completion": "b", "p": 0.4}], r"sum to 0\.9"),
        ([{"prompt": "q", "completion": "a", "p": 0.5}, {"prompt": "q", "completion": "a", "p": 0.5}], "duplicate"),
        ([], "holds no rows"),
    ],
)
def test_file_errors_name_the_line_and_the_key(tmp_path, rows, match):
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=match) as info:
        read_supports(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=match):
        write_support_file(rows, tmp_path / "written.jsonl")
    assert not (tmp_path / "written.jsonl").exists()  # a bad file is never written


def test_config_errors_name_the_support_key(model_dir, tmp_path, capsys):
    """The config only checks that the file exists (it reads no file); the task built from it
    (``eval/tasks.py``, which the CLI calls before any rank starts) names ``support`` for a bad file."""
    path = _write(tmp_path, [], raw='{"prompt": "q", "completion": "a", "p": 1.0}\n{"prompt": \n')
    cfg = from_dict(SweepConfig, _config(model_dir, path, tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"support.*line 2: not JSON"):
        build_task(cfg)
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps(_config(model_dir, path, tmp_path / "o"), default=str))
    assert sweep_main([str(config)]) == 2
    assert "config error" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"support.*does not exist"):
        from_dict(SweepConfig, _config(model_dir, tmp_path / "nope.jsonl", tmp_path / "o"))
    good = write_support_file(ROWS, tmp_path / "good.jsonl")
    with pytest.raises(ConfigError, match=r"metric.*must be known_support"):
        from_dict(SweepConfig, _config(model_dir, good, tmp_path / "o", metric="text"))


def test_normalize_p_divides_by_the_sum(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "p": 2.0}, {"prompt": "q", "completion": "b", "p": 6.0}]
    (support,) = read_supports(_write(tmp_path, rows), normalize_p=True).values()
    np.testing.assert_allclose(support.p, [0.25, 0.75], rtol=0, atol=1e-15)
    within = [{"prompt": "q", "completion": "a", "p": 0.5}, {"prompt": "q", "completion": "b", "p": 0.5 + 5e-7}]
    assert len(read_supports(_write(tmp_path, within))) == 1  # within the 1e-6 tolerance


def test_chat_rows_are_scored_on_the_reply_and_its_end_token(tmp_path):
    tokenizer = chatml_tokenizer()
    supports = read_supports(write_support_file(ROWS, tmp_path / "s.jsonl"))
    encoded = encode_support(tokenizer, supports[next(iter(supports))], sampled=True)
    head_text = tokenizer.apply_chat_template(COLOURS, tokenize=False, add_generation_prompt=True)
    assert encoded.prompt_ids == tokenizer(head_text, add_special_tokens=False).input_ids
    for text, ids in zip(encoded.texts, encoded.completions, strict=True):
        assert tokenizer.decode(list(ids)) == text + "<|im_end|>" and ids[-1] == tokenizer.eos_token_id


def test_a_reply_that_merges_with_the_prompt_shows_both_tokenizations(tmp_path):
    # The generation prompt ends inside a word: "n" + reply "ame" is one BPE token "name".
    template = (
        CHATML.replace("'<|im_start|>assistant\\n'", "'n'")
        .replace(
            "{{ '<|im_start|>' + message['role']",
            "{{ ('n' if message['role'] == 'assistant' else '<|im_start|>' + message['role'] + '\\n')",
        )
        .replace("+ '\\n' + message['content']", "+ message['content']")
    )
    tokenizer = chatml_tokenizer(template)
    rows = [{"messages": COLOURS, "completion": "ame", "p": 1.0}]
    (support,) = read_supports(write_support_file(rows, tmp_path / "s.jsonl")).values()
    both = r"line 1: the completion's tokens differ .* prompt alone ends with .*'n'\] .* has \[.*'name'"
    with pytest.raises(ValueError, match=both):
        encode_support(tokenizer, support, "s.jsonl")


def test_tokenizer_errors(tmp_path):
    rows = [{"messages": COLOURS, "completion": "red", "p": 0.5}, {"messages": COLOURS, "completion": "re d", "p": 0.5}]
    (support,) = read_supports(write_support_file(rows, tmp_path / "s.jsonl")).values()
    with pytest.raises(ValueError, match="need a chat template"):
        encode_support(chatml_tokenizer(None), support)
    # An end-of-turn that is not eos: exact metrics work, sampling could never produce the reply.
    other_end = chatml_tokenizer(CHATML.replace("<|im_end|>", "<|endoftext|>"))
    assert len(encode_support(other_end, support).completions) == 2
    with pytest.raises(ValueError, match=r"line 1: the reply ends with \['<\|endoftext\|>'\].*num_samples: 0"):
        encode_support(other_end, support, sampled=True)


def test_two_completions_with_the_same_ids_are_an_error(tmp_path):
    from tokenizers import normalizers

    tokenizer = chatml_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()  # "Red" and "red": the same ids
    rows = [{"prompt": "name a colour :", "completion": c, "p": 0.5} for c in (" red", " Red")]
    (support,) = read_supports(write_support_file(rows, tmp_path / "s.jsonl")).values()
    with pytest.raises(ValueError, match=r"' red' \(line 1\) and ' Red' \(line 2\) tokenize to the same ids"):
        encode_support(tokenizer, support, "s.jsonl")


SMOLLM2_ROWS = [
    *(
        {"messages": [{"role": "user", "content": "Name a primary colour. One word."}], "completion": c, "p": p}
        for c, p in (("Red", 0.3), ("Blue", 0.3), ("Yellow", 0.3), ("Navy blue", 0.1))
    ),
    *(
        {
            "messages": [
                {"role": "system", "content": "You answer with one word."},
                {"role": "user", "content": "Name a season of the year."},
            ],
            "completion": c,
            "p": p,
        }
        for c, p in (("Spring", 0.25), ("Summer", 0.25), ("Autumn (fall)", 0.3), ("Winter", 0.2))
    ),
]


@pytest.mark.slow
def test_smollm2_through_its_chatml_template(tmp_path):
    """The converted SmolLM2-135M-Instruct with its own tokenizer and ChatML template (a default system
    turn when the messages have none), completions of different lengths in batches of 2: the sweep's
    numbers equal the plain teacher-forced loop's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_dist.convert import convert_gguf, smollm2_gguf

    model_dir = convert_gguf(smollm2_gguf(), tmp_path / "smollm2")
    support = write_support_file(SMOLLM2_ROWS, tmp_path / "support.jsonl")
    cfg = from_dict(SweepConfig, _config({"smollm2": str(model_dir)}, support, tmp_path / "out", dtype="float32"))
    compute_shard(cfg, 0, 1, progress=False)
    result = aggregate(cfg, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    references = reference_metrics(model, tokenizer, SMOLLM2_ROWS, torch.float32)
    exacts = reference_metrics(model, tokenizer, SMOLLM2_ROWS, torch.float64)
    for t, expected, exact in zip(TEMPERATURES, references, exacts, strict=True):
        got = [r for r in result["prompt_rows"] if r["temperature"] == t]
        assert len(got) == 2
        for row, (precision, recall), (precision64, recall64) in zip(
            got, expected.values(), exact.values(), strict=True
        ):
            assert row["precision"] == pytest.approx(precision, rel=1e-6, abs=0)
            assert row["recall"] == pytest.approx(recall, rel=1e-6, abs=0)
            # 30 fp32 layers: Q_T differs from the float64 forward's by up to ~2e-5 relative (measured)
            assert row["precision"] == pytest.approx(precision64, rel=1e-4, abs=0)
            assert row["recall"] == pytest.approx(recall64, rel=1e-4, abs=0)
    assert max(r["recall"] for r in result["prompt_rows"]) > 0.1  # not a comparison of near-zeros
