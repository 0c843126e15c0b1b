"""Seeds derived from names: one pure function every layer may call (eval's known-support sampling,
its text generation).  Imports nothing from the package, so any layer can depend on it."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (model name, T, prompt, sample index, ...).

    Hashing ``repr(parts)`` makes the seed independent of the process, the rank and the order in
    which work is done, unlike Python's salted ``hash``; 63 bits fit ``torch.manual_seed``.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
