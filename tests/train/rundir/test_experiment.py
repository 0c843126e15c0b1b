"""recall_dist/train/rundir/experiment.py: the fingerprint names the keys that change the experiment, and
a resume with other values stops with them.  A checkpoint written before the chat/validation data keys
existed is the same experiment: the new keys at their defaults are no difference, a changed value still
is, and the validation set is never fingerprinted (adding one continues the run)."""

from __future__ import annotations

import json

import pytest

from recall_dist.configtree import to_dict
from recall_dist.train.config import load_train_config
from recall_dist.train.rundir.errors import RunDirError
from recall_dist.train.rundir.experiment import check_same_experiment, config_fingerprint, fingerprint_differences
from tests.train.helpers import build, tiny_config_dict

NEW_KEYS = ("data.messages_field", "data.assistant_turns", "data.chat_template")


def test_new_data_keys_at_their_defaults_continue_an_old_checkpoint():
    current = config_fingerprint(to_dict(load_train_config("configs/tiny_cpu.yaml")))
    old = {"keys": {k: v for k, v in current["keys"].items() if k not in NEW_KEYS}}
    assert fingerprint_differences(old, current) == []
    chat = config_fingerprint(to_dict(load_train_config("configs/tiny_cpu.yaml", ["data.assistant_turns=last"])))
    assert fingerprint_differences(old, chat) == ["data.assistant_turns: '(not set)' -> 'last'"]


def test_the_validation_set_is_not_fingerprinted(tmp_path):
    base = ["data={source: data/chats.jsonl}"]
    plain = config_fingerprint(to_dict(load_train_config("configs/tiny_cpu.yaml", base)))
    held_out = ["data={source: data/chats.jsonl, eval_split: 'train[90%:]'}", "train.eval_every=10"]
    evaluated = config_fingerprint(to_dict(load_train_config("configs/tiny_cpu.yaml", held_out)))
    assert evaluated["sha256"] == plain["sha256"]
    assert not any(key.startswith("data.eval_") for key in evaluated["keys"])


def test_fingerprint_names_the_keys_that_change_the_experiment(tmp_path):
    base = build(tiny_config_dict(tmp_path))
    changed = build(
        tiny_config_dict(
            tmp_path / "other",
            loss={"name": "cdiv", "params": {"alpha": 2.0}, "chunk_size": 64},
            optim={"lr": 1e-3},
            train={"max_steps": 99, "log_every": 3},
        )
    )
    a, b = config_fingerprint(to_dict(base)), config_fingerprint(to_dict(changed))
    assert a["sha256"] != b["sha256"]
    # The run length, logging, output dir and the chunk size (a memory knob) do not change the experiment.
    assert fingerprint_differences(a, b) == ["loss.params.alpha: 1.4 -> 2.0", "optim.lr: 0.003 -> 0.001"]
    assert fingerprint_differences(a, json.loads(json.dumps(a))) == []
    with pytest.raises(RunDirError, match=r"(?s)different experiment.*loss.params.alpha: 1.4 -> 2.0.*optim.lr"):
        check_same_experiment(a, b, tmp_path / "step_00000004", allow_change=False)
    assert len(check_same_experiment(a, b, tmp_path, allow_change=True)) == 2


def test_kernel_choices_are_not_the_experiment():
    """Changing how the loss is computed (kernel, schedule, matmul, tiles, chunking) continues the run."""
    from recall_dist.train.rundir.experiment import config_fingerprint, fingerprint_differences

    base = {"model": {"name_or_path": "m"}, "loss": {"name": "cdiv", "params": {"alpha": 1.4}, "chunk_size": 1024}}
    other = {
        "model": {"name_or_path": "m"},
        "loss": {
            "name": "cdiv",
            "params": {"alpha": 1.4},
            "chunk_size": 256,
            "kernel": "triton",
            "head_schedule": "single",
            "head_matmul": "cublas",
            "triton_tiles": [64, 64, 64, 64, 64, 64],
        },
    }
    a, b = config_fingerprint(base), config_fingerprint(other)
    assert a["sha256"] == b["sha256"] and fingerprint_differences(a, b) == []
    other["loss"]["params"]["alpha"] = 2.0
    assert fingerprint_differences(a, config_fingerprint(other)) == ["loss.params.alpha: 1.4 -> 2.0"]


def test_a_checkpoint_without_fingerprint_is_refused(tmp_path):
    import pytest

    from recall_dist.train.rundir.errors import RunDirError
    from recall_dist.train.rundir.experiment import read_fingerprint

    (tmp_path / "config.yaml").write_text("loss: {name: nll}\n")
    with pytest.raises(RunDirError, match=r"has no fingerprint\.json"):
        read_fingerprint(tmp_path)
