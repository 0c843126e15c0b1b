"""Tokenizers: a character tokenizer for the built-in synthetic tasks (one id per character, so
the sweep can enumerate completions exactly), and ``load_tokenizer`` that also opens Hugging Face ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from recall_dist.data.sources import looks_local

TOKENIZER_FILE = "recall_dist_tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


class CharTokenizer:
    """Specials ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, then one id per character of ``alphabet``
    (in the alphabet's order: character ``alphabet[i]`` has id ``3 + i``).
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    pad_token, bos_token, eos_token = SPECIAL_TOKENS

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet = {alphabet!r}: must be a non-empty string")
        repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
        if repeated:
            raise ValueError(f"alphabet = {alphabet!r}: characters must be distinct; repeated: {repeated}")
        self.alphabet = alphabet
        self._char_to_id = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(alphabet)}
        self.vocab_size = len(SPECIAL_TOKENS) + len(alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_bos else []
        for position, char in enumerate(text):
            token = self._char_to_id.get(char)
            if token is None:
                raise ValueError(
                    f"character {char!r} (position {position} of {text!r}) is not in the "
                    f"tokenizer alphabet {self.alphabet!r}"
                )
            ids.append(token)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor); specials render as ``<pad>`` etc. unless skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        pieces = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is out of range for vocab_size {self.vocab_size}")
            if token < len(SPECIAL_TOKENS):
                if not skip_special_tokens:
                    pieces.append(SPECIAL_TOKENS[token])
            else:
                pieces.append(self.alphabet[token - len(SPECIAL_TOKENS)])
        return "".join(pieces)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        with open(path, "w") as f:
            json.dump({"type": "char", "special_tokens": list(SPECIAL_TOKENS), "alphabet": self.alphabet}, f)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> CharTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}")
        with open(path) as f:
            data = json.load(f)
        if data.get("type") != "char" or data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(
                f"{path}: not a recall_dist character tokenizer (type={data.get('type')!r}, "
                f"special_tokens={data.get('special_tokens')!r})"
            )
        return cls(data["alphabet"])

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_path: str | os.PathLike):
    """Open a tokenizer by name or path.

    - a directory holding ``recall_dist_tokenizer.json`` -> ``CharTokenizer``;
    - ``"char:<task>"`` (e.g. ``"char:product"``) -> ``CharTokenizer`` over that synthetic task's alphabet;
    - anything else -> ``transformers.AutoTokenizer.from_pretrained`` (local directory or hub name).
    """
    name = os.fspath(name_or_path)
    if name.startswith("char:"):
        from recall_dist.data.synthetic import build_task

        return CharTokenizer(build_task(name[len("char:") :]).alphabet)
    if (Path(name) / TOKENIZER_FILE).is_file():
        return CharTokenizer.from_pretrained(name)
    # Hub ids are "name" or "org/name": anything else that is path-like must exist locally, so a
    # typo in a path fails here with the path, before any request to the hub.
    if looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"tokenizer path {name!r} does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"cannot load tokenizer {name!r}: not a directory with {TOKENIZER_FILE}, not "
            f"'char:<task>', and transformers.AutoTokenizer failed (offline, or no such local "
            f"path / hub repo): {reason}"
        ) from e
