"""The distributed temperature sweep: work items = models x temperatures x prompts (or reference
chunks for ``metric: text``), cut into ``num_shards`` contiguous shards.

Two entry points, also used by the Ray driver (``launch/ray_sweep.py``):

- ``compute_shard(cfg, shard_index, num_shards)`` evaluates one shard and writes
  ``<output_dir>/shards/shard-IIIII-of-NNNNN.json`` atomically; a shard file whose config
  fingerprint matches is reused, so re-running a sweep resumes it.
- ``aggregate(cfg, num_shards)`` reads every shard and writes ``sweep.csv``, ``sweep.json`` and
  ``pr_curve.png`` (see ``aggregate.py``).

Every number of a work item depends only on (model, temperature, prompt, sample index, config),
never on the shard or rank that computed it, and aggregation sums in work-item order: the tables
are identical for any number of workers.  ``run_sweep`` drives both under
torchrun/srun (each rank takes shards rank, rank + world, ...; rank 0 aggregates).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recall_dist.eval import known_support, metrics, text
from recall_dist.eval.config import ModelSpec, SweepConfig


@dataclass(frozen=True)
class WorkItem:
    index: int
    model: str
    temperature: float
    prompt: str = ""  # known_support: the prompt
    row_start: int = 0  # text: first reference row of the chunk
    row_stop: int = 0


def reference_rows(cfg: SweepConfig) -> list[dict]:
    """``metric: text`` references: the first ``text.num_texts`` rows of the jsonl file, or samples of the task."""
    if cfg.text.references is None:
        return cfg.build_task().sample(cfg.text.num_texts, seed=cfg.seed)
    rows = []
    with open(cfg.text.references) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == cfg.text.num_texts:
                break
    if len(rows) < cfg.text.num_texts:
        raise ValueError(f"text.references {cfg.text.references!r} holds {len(rows)} rows < text.num_texts")
    return [{"prompt": r.get("prompt", ""), "completion": r["completion"]} for r in rows]


def work_items(cfg: SweepConfig) -> list[WorkItem]:
    """All work items, in the fixed order models x temperatures x (prompts | reference chunks)."""
    items: list[WorkItem] = []
    if cfg.metric == "known_support":
        units = [{"prompt": p} for p in cfg.build_task().prompts()]
    else:
        n, cs = cfg.text.num_texts, cfg.text.chunk_size
        units = [{"row_start": s, "row_stop": min(s + cs, n)} for s in range(0, n, cs)]
    for model in cfg.models:
        for t in cfg.temperatures:
            for unit in units:
                items.append(WorkItem(len(items), model.name, t, **unit))
    return items


def shard_items(items: list, shard_index: int, num_shards: int) -> list:
    """Contiguous block ``shard_index`` of ``num_shards`` (contiguous: a shard loads few models)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index = {shard_index}: must be in [0, {num_shards})")
    n = len(items)
    return items[shard_index * n // num_shards : (shard_index + 1) * n // num_shards]


def shard_path(cfg: SweepConfig, shard_index: int, num_shards: int) -> Path:
    return Path(cfg.output_dir) / "shards" / f"shard-{shard_index:05d}-of-{num_shards:05d}.json"


def read_shard(path: Path, cfg: SweepConfig) -> dict | None:
    """The shard's content if it exists and was computed with this config, else None."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if data.get("fingerprint") == json.loads(json.dumps(cfg.fingerprint())) else None


def load_model(spec: ModelSpec, cache_dir: Path):
    """(model, tokenizer) on this rank's device, in eval mode.  A raw training checkpoint (no
    ``config.json``) is first exported to Hugging Face format under ``cache_dir/<name>``."""
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer

    path = Path(spec.path).expanduser()
    if not (path / "config.json").is_file():
        from recall_dist.train.export import export_hf

        exported = cache_dir / spec.name
        if not (exported / "config.json").is_file():
            export_hf(path, exported)
        path = exported
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), load_tokenizer(spec.tokenizer or path)


def _evaluate(cfg: SweepConfig, item: WorkItem, model, tokenizer, cache: dict) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.metric == "known_support":
        task = cache.setdefault("task", cfg.build_task())
        key = ("encoded", item.prompt)
        if key not in cache:
            cache[key] = known_support.encode_prompt(tokenizer, item.prompt, task.target_distribution(item.prompt))
        lambdas = np.asarray(cfg.lambdas) if cfg.lambdas is not None else metrics.default_lambdas()
        record = known_support.evaluate_prompt(
            model,
            cache[key],
            item.temperature,
            recall_at_n=cfg.recall_at_n,
            num_samples=cfg.num_samples,
            lambdas=lambdas,
            seed=known_support.derive_seed(cfg.seed, item.model, item.temperature, item.prompt),
            score_batch_size=cfg.score_batch_size,
            generate_batch_size=cfg.generate_batch_size,
            pad_id=pad,
            eos_id=tokenizer.eos_token_id,
        )
        return {"weight": task.prompt_distribution()[item.prompt], **record}
    rows = cache.setdefault("rows", reference_rows(cfg))[item.row_start : item.row_stop]
    max_new = cfg.text.max_new_tokens or cfg.build_task().max_completion_chars + 1
    seed = known_support.derive_seed(cfg.seed, item.model, item.temperature, "text", item.row_start)
    return {
        "texts": text.generate_texts(model, tokenizer, [r["prompt"] for r in rows], item.temperature, seed, max_new)
    }


def compute_shard(cfg: SweepConfig, shard_index: int, num_shards: int, progress: bool = True) -> Path:
    """Evaluate shard ``shard_index`` of ``num_shards`` and write its JSON; return its path.

    Resumable: returns at once if the file exists with this config's fingerprint.  Safe to call
    from any process (a Ray task, a torchrun rank); the write is atomic (tmp file + rename).
    """
    from tqdm.auto import tqdm

    path = shard_path(cfg, shard_index, num_shards)
    if read_shard(path, cfg) is not None:
        return path
    items = shard_items(work_items(cfg), shard_index, num_shards)
    specs = {m.name: m for m in cfg.models}
    records, loaded, cache = [], (None, None, None), {}
    for item in tqdm(items, desc=f"sweep shard {shard_index + 1}/{num_shards}", disable=not progress, unit="item"):
        if loaded[0] != item.model:
            loaded = None  # free the previous model before loading the next
            loaded = (item.model, *load_model(specs[item.model], Path(cfg.output_dir) / "exported"))
            cache = {}
        record = _evaluate(cfg, item, loaded[1], loaded[2], cache)
        records.append(
            {
                "item": item.index,
                "model": item.model,
                "temperature": item.temperature,
                "prompt": item.prompt,
                "row_start": item.row_start,
                **record,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(
            {
                "fingerprint": cfg.fingerprint(),
                "shard_index": shard_index,
                "num_shards": num_shards,
                "records": records,
            },
            f,
        )
    os.replace(tmp, path)
    return path


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): torch.distributed if initialised, else torchrun's or
    Slurm's environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def run_sweep(
    cfg: SweepConfig, rank: int | None = None, world_size: int | None = None, wait_timeout: float = 24 * 3600.0
) -> dict | None:
    """Compute this rank's shards (rank, rank + world, ... of ``cfg.num_shards`` or ``world``),
    wait for the others (a barrier if a process group exists, else polling the shard files), and on
    rank 0 aggregate.  Returns the aggregate (rank 0) or None."""
    import torch.distributed as dist

    from recall_dist.eval.aggregate import aggregate

    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    num_shards = cfg.num_shards or world_size
    for shard in range(rank, num_shards, world_size):
        compute_shard(cfg, shard, num_shards, progress=rank == 0)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    deadline = time.monotonic() + wait_timeout
    while not all(read_shard(shard_path(cfg, s, num_shards), cfg) for s in range(num_shards)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"shards of {cfg.output_dir} still missing after {wait_timeout:.0f} s")
        time.sleep(2.0)
    return aggregate(cfg, num_shards)
