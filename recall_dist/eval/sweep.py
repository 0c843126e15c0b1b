"""Compute one shard of the temperature sweep (``shards.py`` says which work items it holds).

``compute_shard(cfg, shard_index, num_shards)`` evaluates the shard's work items and writes
``<output_dir>/shards/shard-IIIII-of-NNNNN.json`` atomically; a shard file whose key (config and
models' content) matches is reused, so re-running a sweep resumes it.  A work item is evaluated at
every temperature: known-support scoring runs each completion through the model once and tempers
the logits for every T; text items generate at every T and embed the generations (and their
reference rows) here, so that aggregation only has k-NN counting left.

Every number of a work item depends only on (model, temperature, prompt, sample index, config),
never on the shard or rank that computed it.  Drivers: ``driver.run_sweep`` (torchrun / srun /
one process) and ``launch/ray_sweep.py`` (Ray tasks).
"""

from __future__ import annotations

from pathlib import Path

from recall_dist.eval import known_support, text
from recall_dist.eval.config import SweepConfig
from recall_dist.eval.loading import load_model
from recall_dist.eval.shards import (
    WorkItem,
    encode_array,
    read_shard,
    reference_rows,
    shard_items,
    shard_key,
    shard_path,
    work_items,
    write_json_atomic,
)
from recall_dist.eval.tasks import build_task
from recall_dist.eval.tokens import pad_token_id
from recall_dist.seeding import derive_seed


def _known_support_record(cfg: SweepConfig, item: WorkItem, model, tokenizer, task) -> dict:
    if cfg.support is not None:  # a user's support file: rows tokenized as training tokenizes them
        encoded = task.encode(tokenizer, item.prompt, sampled=cfg.num_samples > 0)
    else:
        encoded = known_support.encode_prompt(tokenizer, item.prompt, task.target_distribution(item.prompt))
    per_t = known_support.evaluate_prompt(
        model,
        encoded,
        cfg.temperatures,
        recall_at_n=cfg.recall_at_n,
        num_samples=cfg.num_samples,
        lambdas=cfg.lambda_grid(),
        seeds=[derive_seed(cfg.seed, item.model, t, item.prompt) for t in cfg.temperatures],
        score_batch_size=cfg.score_batch_size,
        generate_batch_size=cfg.generate_batch_size,
        pad_id=pad_token_id(tokenizer),
        eos_id=tokenizer.eos_token_id,
    )
    return {"prompt": item.prompt, "weight": task.prompt_distribution()[item.prompt], "temperatures": per_t}


def _text_encoder(cfg: SweepConfig, model, tokenizer, cache: dict):
    """The embedding model: the evaluated LM's hidden states, or one sentence-transformers model per process."""
    if cfg.text.encoder == "lm":
        return text.HiddenStateEncoder(model, tokenizer)
    if "sentence-transformers" not in cache:
        cache["sentence-transformers"] = text.SentenceTransformerEncoder(cfg.text.encoder_path)
    return cache["sentence-transformers"]


def _text_record(cfg: SweepConfig, item: WorkItem, model, tokenizer, cache: dict) -> dict:
    rows = cache.setdefault("rows", reference_rows(cfg))[item.row_start : item.row_stop]
    max_new = cfg.text.max_new_tokens or build_task(cfg).max_completion_chars + 1
    encoder = _text_encoder(cfg, model, tokenizer, cache)
    # One seed per (model, T, reference row): a text does not depend on the chunking or the rank.
    seeds = [
        [derive_seed(cfg.seed, item.model, t, "text", row) for row in range(item.row_start, item.row_stop)]
        for t in cfg.temperatures
    ]
    per_t = text.generate_texts(
        model, tokenizer, [r["prompt"] for r in rows], cfg.temperatures, seeds, max_new, cfg.generate_batch_size
    )
    generations = [{"texts": texts, "embeddings": encode_array(encoder.encode(texts))} for texts in per_t]
    record = {"row_start": item.row_start, "row_stop": item.row_stop, "temperatures": generations}
    # References are embedded per model with the LM encoder (its own hidden states), once otherwise.
    if cfg.text.encoder == "lm" or item.model == cfg.models[0].name:
        record["reference_embeddings"] = encode_array(encoder.encode([r["completion"] for r in rows]))
    return record


def compute_shard(cfg: SweepConfig, shard_index: int, num_shards: int, progress: bool = True) -> Path:
    """Evaluate shard ``shard_index`` of ``num_shards`` and write its JSON; return its path.

    Resumable: returns at once if the file exists with this config's and these models' key.  Safe
    to call from any process (a Ray task, a torchrun rank); the write is atomic (tmp file + rename).
    """
    from tqdm.auto import tqdm

    path = shard_path(cfg, shard_index, num_shards)
    key = shard_key(cfg, shard_index, num_shards)
    if read_shard(cfg, shard_index, num_shards, key) is not None:
        return path
    items = shard_items(work_items(cfg), shard_index, num_shards)
    specs = {m.name: m for m in cfg.models}
    records, loaded, cache = [], (None, None, None), {}
    task = build_task(cfg) if cfg.metric == "known_support" else None
    for item in tqdm(items, desc=f"sweep shard {shard_index + 1}/{num_shards}", disable=not progress, unit="item"):
        if loaded[0] != item.model:
            loaded = None  # free the previous model before loading the next
            exported = Path(cfg.output_dir) / "exported"
            loaded = (item.model, *load_model(specs[item.model], exported, key["models"][item.model], cfg.dtype))
        _, model, tokenizer = loaded
        if cfg.metric == "known_support":
            record = _known_support_record(cfg, item, model, tokenizer, task)
        else:
            record = _text_record(cfg, item, model, tokenizer, cache)
        records.append({"item": item.index, "model": item.model, **record})
    return write_json_atomic(
        path, {"key": key, "shard_index": shard_index, "num_shards": num_shards, "records": records}
    )
