"""``train.eval_every``: the held-out step objective and NLL of the validation set, over 2 data-parallel
ranks (real FSDP2 and DeepSpeed ZeRO-2 on gloo), on chat data through a real ChatML tokenizer built
offline, compared with a single-process naive computation (plain forward of the exported model, the
weighted NLL formula)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recall_dist.constants import IGNORE_INDEX
from recall_dist.data.chat import tokenize_messages
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.metrics_log import read_metrics
from tests.data.chat_tokenizer import chatml_tokenizer, save_chatml_tokenizer
from tests.train.helpers import build

ALPHA = 1.4


def conversation(a: int, b: int, system: bool) -> dict:
    messages = [{"role": "system", "content": "you are a helpful assistant"}] if system else []
    messages += [
        {"role": "user", "content": f"what is {a} plus {b} ?"},
        {"role": "assistant", "content": f"{a + b}"},
    ]
    return {"messages": messages}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_every")
    train = [conversation(a, b, system=a % 2 == 0) for a in range(4) for b in range(4)]
    held_out = [conversation(a, 9 - a, system=a % 3 == 0) for a in range(7)]  # 7: uneven over 2 ranks
    return {
        "tokenizer": save_chatml_tokenizer(root / "tokenizer"),
        "vocab": len(chatml_tokenizer()),
        "train": write_jsonl(root / "train.jsonl", train),
        "eval": write_jsonl(root / "eval.jsonl", held_out),
        "root": root,
    }


def config(files: dict, out: Path, loss: dict, **train) -> dict:
    return {
        "model": {
            "config": {
                "model_type": "llama",
                "vocab_size": files["vocab"],
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 128,
                "tie_word_embeddings": False,
            },
            "tokenizer": str(files["tokenizer"]),
            "attn_implementation": "sdpa",
        },
        "data": {
            "source": str(files["train"]),
            "eval_source": str(files["eval"]),
            "cache_dir": str(out.parent / "cache"),
        },
        "loss": loss,
        "optim": {"lr": 3e-3, "grad_clip": 0.0},
        "backend": {"name": "fsdp2"},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 2,
            "max_steps": 2,
            "eval_every": 1,
            "progress_bar": False,
            "export_final": False,
            **train,
        },
    }


def _train_worker(data: dict) -> None:
    from recall_dist.train.trainer import run_training

    run_training(build(data))


def naive_held_out(model_dir: Path, tokenizer_dir: Path, eval_file: Path, alpha: float) -> dict[str, float]:
    """One process, one example at a time, full logits: L = sum w l / sum w with w = exp((alpha - 1) l)
    (c-Div's weight, detached), and the mean NLL, over every trained token of the validation set."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    nll = []
    with torch.no_grad():
        for line in eval_file.read_text().splitlines():
            example = tokenize_messages(json.loads(line)["messages"], tokenizer)
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            target = labels[1:]
            valid = target != IGNORE_INDEX
            nll.append(-logp[valid].gather(1, target[valid].unsqueeze(1)).squeeze(1))
    nll = torch.cat(nll)
    w = torch.exp((alpha - 1.0) * nll)
    return {"loss": float((w * nll).sum() / w.sum()), "nll": float(nll.mean()), "tokens": float(nll.numel())}


@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("deepspeed", marks=pytest.mark.slow)])
def test_held_out_objective_is_exact_and_global_over_dp(files, capfd, backend):
    out = files["root"] / f"cdiv_{backend}"
    data = config(files, out, {"name": "cdiv", "params": {"alpha": ALPHA}}, export_final=True, progress_bar=True)
    data["backend"] = {"name": backend, "zero_stage": 2, "bf16": False} if backend == "deepspeed" else {"name": backend}
    run_distributed_test(_train_worker, 2, data)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2] and all("eval_loss" in r for r in records)
    expected = naive_held_out(out / "final", files["tokenizer"], files["eval"], ALPHA)
    last = records[-1]  # evaluated after step 2's update: the exported weights
    assert last["eval_tokens"] == expected["tokens"]
    assert last["eval_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert last["eval_nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert last["eval_loss"] > last["eval_nll"]  # c-Div's weights favour the hard (high-NLL) tokens
    assert records[0]["eval_loss"] != last["eval_loss"]  # step 1's pass saw other weights
    assert f"eval_loss={last['eval_loss']:.4f}" in capfd.readouterr().err  # the progress line


@pytest.mark.slow
def test_evaluating_leaves_the_training_trajectory_unchanged(files):
    """TruncR's buffer takes in what the evaluation's loss calls see; it is put back afterwards, so the
    training losses are those of a run without a validation set."""
    loss = {"name": "truncr", "params": {"drop": 0.3, "min_count": 4, "buffer_size": 64}}
    with_eval = config(files, files["root"] / "truncr_eval", loss, max_steps=4)
    without = config(files, files["root"] / "truncr_plain", loss, max_steps=4, eval_every=0)
    del without["data"]["eval_source"]
    run_distributed_test(_train_worker, 2, with_eval)
    run_distributed_test(_train_worker, 2, without)
    evaluated, plain = read_metrics(files["root"] / "truncr_eval"), read_metrics(files["root"] / "truncr_plain")
    trajectory = [(r["step"], r["loss"], r["nll"], r["tau"]) for r in plain]
    assert json.dumps([(r["step"], r["loss"], r["nll"], r["tau"]) for r in evaluated]) == json.dumps(trajectory)
    assert any(math.isfinite(tau) for *_, tau in trajectory)  # the threshold was in use
    assert all(math.isfinite(r["eval_loss"]) and r["eval_tokens"] > 0 for r in evaluated)


def test_eval_every_without_a_validation_set_names_the_keys(files):
    from recall_dist.configtree import ConfigError

    data = config(files, files["root"] / "none", {"name": "nll"})
    del data["data"]["eval_source"]
    with pytest.raises(ConfigError, match=r"^train.eval_every: 1: there is no validation set: set data.eval_split"):
        build(data)


def test_eval_values_reach_metrics_tensorboard_and_wandb(tmp_path):
    """The validation values of a step go to its metrics.jsonl line, to TensorBoard under ``eval/`` and
    to W&B (stand-in writers record what they are given)."""
    from recall_dist.train.metrics_log import MetricsLogger

    class Recorder:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def log(self, metrics, step):
            self.calls.append((metrics, step))

    logger = MetricsLogger(tmp_path, enabled=True)
    logger._tb, logger._wandb = Recorder(), Recorder()
    logger.log(3, {"loss": 1.5, "eval_loss": 2.5, "eval_nll": 2.0})
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.5, "eval_loss": 2.5, "eval_nll": 2.0}]
    assert logger._tb.calls == [("train/loss", 1.5, 3), ("eval/loss", 2.5, 3), ("eval/nll", 2.0, 3)]
    assert logger._wandb.calls == [({"loss": 1.5, "eval_loss": 2.5, "eval_nll": 2.0}, 3)]
