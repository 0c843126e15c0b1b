"""A checkpoint written before the chat/validation data keys existed is the same experiment: the new
keys at their defaults are no difference, a changed value still is, and the validation set is never
fingerprinted (adding one continues the run)."""

from __future__ import annotations

from recall_dist.configtree import to_dict
from recall_dist.train.config import load_train_config
from recall_dist.train.fingerprint import config_fingerprint, fingerprint_differences

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
