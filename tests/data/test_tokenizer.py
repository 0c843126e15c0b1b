import json

import pytest

from recall_dist.data.synthetic import build_task
from recall_dist.data.tokenizer import TOKENIZER_FILE, CharTokenizer, load_tokenizer


def test_ids_layout_and_round_trip():
    tok = CharTokenizer("0123456789*")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 2, 14)
    assert tok.encode("10*2") == [4, 3, 13, 5]
    assert tok.encode("7", add_bos=True, add_eos=True) == [1, 10, 2]
    assert tok.encode("") == []
    for text in ["", "0", "12*345", "999*"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert tok.decode(ids) == text
    assert tok.decode([1, 4, 2, 0, 0], skip_special_tokens=False) == "<bos>1<eos><pad><pad>"


def test_errors_name_the_character_and_id():
    tok = CharTokenizer("01")
    with pytest.raises(ValueError, match=r"'2'.*position 1"):
        tok.encode("021")
    with pytest.raises(ValueError, match="token id 5"):
        tok.decode([5])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("011")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_decode_accepts_tensors():
    import torch

    tok = CharTokenizer("abc")
    assert tok.decode(torch.tensor([1, 3, 4, 5, 2])) == "abc"
    assert tok.batch_decode(torch.tensor([[3, 2], [5, 0]])) == ["a", "c"]


def test_save_and_load(tmp_path):
    tok = CharTokenizer("0123456789")
    path = tok.save_pretrained(tmp_path / "tok")
    assert path.name == TOKENIZER_FILE
    assert json.loads(path.read_text())["alphabet"] == "0123456789"
    for loaded in (CharTokenizer.from_pretrained(tmp_path / "tok"), load_tokenizer(str(tmp_path / "tok"))):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.alphabet == tok.alphabet and loaded.encode("42") == tok.encode("42")


def test_char_task_names():
    for name in ["product", "product_conditional"]:
        tok = load_tokenizer(f"char:{name}")
        assert tok.alphabet == build_task(name).alphabet
    with pytest.raises(ValueError, match="unknown synthetic task"):
        load_tokenizer("char:nope")


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_tokenizer(str(tmp_path / "does-not-exist"))


def test_hugging_face_tokenizer_from_local_dir(tmp_path):
    """A real (word-level) Hugging Face tokenizer written locally, loaded through AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert not isinstance(tok, CharTokenizer)
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [3, 4]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    # An existing directory holding no tokenizer at all: the error names it.
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="empty"):
        load_tokenizer(tmp_path / "empty")
