"""The sweep's plan: the work items, how they are cut into shards, and the shard files (names,
keys, atomic writes).  No model code: ``sweep.py`` computes shards, ``aggregate.py`` reads them.

A work item is (model, prompt) for ``metric: known_support`` and (model, chunk of reference rows)
for ``metric: text``; either is evaluated at *every* temperature of the grid, so a model scores a
sequence once (teacher-forced logits do not depend on T, only their scaling does).

A shard file is keyed by the sweep config (``SweepConfig.fingerprint``) and by the content of the
models it holds (``content_hash.directory_fingerprint``): a model retrained at the same path is
evaluated again, an unchanged one is reused.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recall_dist.eval.config import ModelSpec, SweepConfig
from recall_dist.eval.content_hash import directory_fingerprint
from recall_dist.eval.tasks import build_task
from recall_dist.io import atomic_write_json


@dataclass(frozen=True)
class WorkItem:
    index: int
    model: str
    prompt: str = ""  # known_support: the prompt
    row_start: int = 0  # text: reference rows [row_start, row_stop)
    row_stop: int = 0


def reference_rows(cfg: SweepConfig) -> list[dict]:
    """``metric: text`` references: the first ``text.num_texts`` rows of the jsonl file, or samples of the task."""
    if cfg.text.references is None:
        return build_task(cfg).sample(cfg.text.num_texts, seed=cfg.seed)
    rows = []
    with open(cfg.text.references) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == cfg.text.num_texts:
                break
    if len(rows) < cfg.text.num_texts:
        raise ValueError(f"text.references {cfg.text.references!r} holds {len(rows)} rows < text.num_texts")
    return [_reference_row(r, cfg.text.references, i) for i, r in enumerate(rows)]


def _reference_row(row: dict, source: str, index: int) -> dict:
    """``{"prompt", "completion"}`` of a references row: given as such, or as chat ``messages`` whose last
    turn is the assistant's reference reply and whose earlier turns are the prompt (a message list,
    which generation renders through the chat template)."""
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"):
            raise ValueError(f"text.references {source!r}, row {index}: 'messages' must end with an assistant turn")
        return {"prompt": messages[:-1], "completion": messages[-1]["content"]}
    if "completion" not in row:
        raise ValueError(f"text.references {source!r}, row {index}: needs 'completion' (and 'prompt') or 'messages'")
    return {"prompt": row.get("prompt", ""), "completion": row["completion"]}


def work_items(cfg: SweepConfig) -> list[WorkItem]:
    """All work items, in the fixed order models x (prompts | reference chunks)."""
    if cfg.metric == "known_support":
        units = [{"prompt": p} for p in build_task(cfg).prompts()]
    else:
        n, cs = cfg.text.num_texts, cfg.text.chunk_size
        units = [{"row_start": s, "row_stop": min(s + cs, n)} for s in range(0, n, cs)]
    items: list[WorkItem] = []
    for model in cfg.models:
        for unit in units:
            items.append(WorkItem(len(items), model.name, **unit))
    return items


def shard_items(items: list, shard_index: int, num_shards: int) -> list:
    """Contiguous block ``shard_index`` of ``num_shards`` (contiguous: a shard loads few models)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index = {shard_index}: must be in [0, {num_shards})")
    n = len(items)
    return items[shard_index * n // num_shards : (shard_index + 1) * n // num_shards]


def shard_path(cfg: SweepConfig, shard_index: int, num_shards: int) -> Path:
    return Path(cfg.output_dir) / "shards" / f"shard-{shard_index:05d}-of-{num_shards:05d}.json"


def model_fingerprint(cfg: SweepConfig, spec: ModelSpec) -> str:
    """The content fingerprint of a model directory, and of its tokenizer directory if it has its own."""
    parts = [directory_fingerprint(spec.path, cfg.model_fingerprint)]
    if spec.tokenizer is not None and Path(spec.tokenizer).expanduser().exists():
        parts.append(directory_fingerprint(spec.tokenizer, cfg.model_fingerprint))
    return "+".join(parts)


def shard_key(cfg: SweepConfig, shard_index: int, num_shards: int) -> dict:
    """What shard ``shard_index``'s numbers depend on: the sweep config and its models' content."""
    names = dict.fromkeys(item.model for item in shard_items(work_items(cfg), shard_index, num_shards))
    specs = {m.name: m for m in cfg.models}
    return {"config": cfg.fingerprint(), "models": {name: model_fingerprint(cfg, specs[name]) for name in names}}


def read_json_if_key(path: Path, key: dict) -> dict | None:
    """The content of ``path`` if it exists, parses, and was written under ``key``; else None."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if data.get("key") == json.loads(json.dumps(key)) else None


def read_shard(cfg: SweepConfig, shard_index: int, num_shards: int, key: dict | None = None) -> dict | None:
    """Shard ``shard_index``'s content if it exists and was computed with this config and these
    models' content, else None."""
    path = shard_path(cfg, shard_index, num_shards)
    return read_json_if_key(path, key if key is not None else shard_key(cfg, shard_index, num_shards))


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write ``data`` to ``path`` via a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # No fsync: a shard that a power loss truncates fails to parse, reads as missing
    # (``read_json_if_key``) and is computed again; the sweep writes many of them.
    return atomic_write_json(path, data, fsync=False)


def encode_array(x: np.ndarray) -> dict:
    """A float32 matrix as JSON (base64 of its bytes: exact, and a shard stays one atomic file)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return {"shape": list(x.shape), "float32": base64.b64encode(x.tobytes()).decode("ascii")}


def decode_array(data: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data["float32"]), dtype=np.float32).reshape(data["shape"])
