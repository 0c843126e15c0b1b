"""A misspelled local model or tokenizer path (a local-looking path, or a near miss of a local model
directory's name) is a one-line ``ConfigError`` naming the key, raised with sockets blocked (no request
to the hub); a chat template set by ``data.chat_template`` reaches the
tokenizer that training uses."""

from __future__ import annotations

import socket

import pytest

from recall_dist.configtree import ConfigError, load_yaml
from recall_dist.presets import MODEL_PRESET_DIR
from recall_dist.train.models import check_model_path
from recall_dist.train.resources import validate_resources
from tests.data.chat_tokenizer import CHATML, chatml_tokenizer, save_chatml_tokenizer
from tests.train.helpers import build, tiny_config_dict


def tiny_llama(**model) -> dict:
    """The tiny-llama preset as a mapping, with ``model`` keys replaced."""
    return {**load_yaml(MODEL_PRESET_DIR / "tiny-llama.yaml"), **model}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["./my-modle", "~/no-such-models-xyz/m", "a/b/c", "models/tiny-modle"])
def test_local_looking_paths_must_exist(tmp_path, monkeypatch, no_network, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so models/<name> is a local path, not a hub org/name
    with pytest.raises(ConfigError, match=rf"^model.name_or_path: '{name}': no such local directory \(a hub model"):
        check_model_path(name)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ConfigError, match=r"'weights.bin': is a file, not a model directory"):
        check_model_path("weights.bin")
    check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub name: left to the hub client
    check_model_path(str(tmp_path / "models"))


def test_a_near_miss_of_a_local_model_directory_is_a_typo(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    (tmp_path / "gpt2-notes").mkdir()  # not a model directory: never taken for one
    with pytest.raises(ConfigError, match=r"'my-modle': no such local directory; did you mean 'my-model'\?"):
        check_model_path("my-modle")
    check_model_path("my-model")
    check_model_path("gpt2")  # a bare hub name with no local look-alike model
    save_chatml_tokenizer(tmp_path / "my-tokenizer")
    with pytest.raises(ConfigError, match=r"^model.tokenizer: 'my-tokeniser': .*did you mean 'my-tokenizer'\?"):
        check_model_path("my-tokeniser", "model.tokenizer")


def test_validate_resources_names_the_key_without_the_network(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    data = tiny_config_dict(tmp_path / "run", model={"name_or_path": "models/tiny-modle"})
    with pytest.raises(ConfigError, match=r"^model.name_or_path: 'models/tiny-modle': no such local directory"):
        validate_resources(build(data))
    data = tiny_config_dict(tmp_path / "run", model=tiny_llama(tokenizer="./tokenizr"))
    with pytest.raises(ConfigError, match=r"^model.tokenizer: './tokenizr': no such local directory"):
        validate_resources(build(data))


def test_data_chat_template_reaches_the_training_tokenizer(tmp_path):
    tokenizer_dir = save_chatml_tokenizer(tmp_path / "tok", template=None)
    model = tiny_llama(tokenizer=str(tokenizer_dir))
    model["config"]["vocab_size"] = len(chatml_tokenizer())
    data = tiny_config_dict(tmp_path / "run", model=model)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    data["data"]["chat_template"] = str(tmp_path / "chatml.jinja")
    assert validate_resources(build(data)).chat_template == CHATML
    data["data"]["chat_template"] = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ConfigError, match=r"^data.chat_template: the template does not render"):
        validate_resources(build(data))
