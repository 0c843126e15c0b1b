"""No rank ever holds the full model: 2 gloo ranks build a ~1B-parameter Llama (random init from a
config, and loaded from a multi-shard safetensors checkpoint) under ZeRO-3 and under FSDP2, and each rank's
peak resident memory (VmHWM) rises by less than 0.6 x the full model's bytes while it does -- a design that
builds the whole model on every rank first rises by at least 1.0 x.  ``recall-dist plan``'s estimate of that
rise is within 25% of the measurement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from recall_dist.distributed.testing import run_distributed_test
from tests.train.helpers import build, tiny_config_dict

# ~1.0B parameters (OLMo-1B / TinyLlama size), small enough for 2 CPU ranks in CI.  A modest vocabulary
# keeps the largest single module (built whole, one at a time) at ~1% of the model, as at 7B-13B scale
# (Llama-2-7B's embedding is 2% of it); with 2 ranks the shards alone are 0.5 x the model.
BIG = {
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
WORLD = 2
BACKENDS = {"fsdp2": {"name": "fsdp2"}, "zero3": {"name": "deepspeed", "zero_stage": 3}}

pytestmark = [pytest.mark.slow]


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _config(model: dict, backend: dict) -> dict:
    return tiny_config_dict("unused", model=model, backend=backend, data={"num_samples": 64})


def _construct_worker(data: dict, result_dir: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed

    cfg = build(data)
    ctx = init_distributed()
    loss = cfg.loss.build()
    _warm_up(cfg)
    before = _kib("VmHWM")
    if cfg.backend.name == "fsdp2":
        from recall_dist.train.backends.fsdp2 import FSDP2Engine

        engine = FSDP2Engine(cfg, ctx, loss, 1, 1)
        model = engine.module.model
    else:
        from recall_dist.train.backends.deepspeed import build_deepspeed_model, deepspeed_config

        model = build_deepspeed_model(cfg, ctx, deepspeed_config(cfg, 1, ctx.world_size))
    peak = _kib("VmHWM")
    # The rank's own parameters, as sanity that the build happened (and so that the peak is not empty).
    local = sum(
        (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p).numel())
        for p in {id(p): p for p in model.parameters()}.values()
    )
    checksum = float(sum(p.float().sum() for p in _local_tensors(model)))
    record = {"before": before, "peak": peak, "local_numel": local, "checksum": checksum}
    Path(result_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(record))


def _warm_up(cfg) -> None:
    """Import what construction imports (modeling code, FSDP, DeepSpeed's comm) before the baseline is read:
    code pages are not the model's memory."""
    import torch.distributed.fsdp  # noqa: F401

    from recall_dist.train.models import build_model

    build_model(cfg.model, meta=True)
    if cfg.backend.name == "deepspeed":
        import deepspeed

        deepspeed.init_distributed()


def _local_tensors(model):
    for p in {id(p): p for p in model.parameters()}.values():
        if hasattr(p, "ds_tensor"):
            yield p.ds_tensor
        elif hasattr(p, "to_local"):
            yield p.to_local()
        else:
            yield p


def _measure(tmp_path: Path, model: dict, backend: str, monkeypatch) -> tuple[list[dict], int]:
    data = _config(model, BACKENDS[backend])
    # glibc serves the 8-32 MB blocks of construction from its heap and, on a CPU host, keeps freed blocks
    # fragmented: under zero.Init the ranks that *receive* each new module's broadcast peaked 0.05-0.17 x the
    # model higher than rank 0 for that reason alone (measured; not our allocations, and on GPUs the
    # parameters live in the CUDA allocator).  Blocks >= 1 MiB mmapped and returned on free take glibc's
    # heap policy out of the measurement; the spawned ranks inherit this environment.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    out = tmp_path / f"{backend}-{'pre' if 'name_or_path' in model else 'init'}"
    out.mkdir()
    run_distributed_test(_construct_worker, WORLD, data, str(out), timeout=1200)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    from recall_dist.train.models import build_model, count_parameters

    params = count_parameters(build_model(build(data).model, meta=True))
    return records, params


def _plan_estimate(model: dict, backend: str) -> float:
    from recall_dist.train.memory_plan import make_plan

    plan = make_plan(build(_config(model, BACKENDS[backend])), 1, WORLD, device="cpu")
    return plan.construction_bytes


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The ~1B model written by Hugging Face in 1 GiB safetensors shards (fp32, ~3.8 GB on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recall_dist.data import load_tokenizer

    root = tmp_path_factory.mktemp("big")
    directory = root / "pretrained"
    _check_free_disk(root, 4.5e9)
    params = dict(BIG)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")
    load_tokenizer("char:product").save_pretrained(directory)
    del model
    assert len(list(directory.glob("model-*.safetensors"))) >= 3
    yield directory
    shutil.rmtree(root, ignore_errors=True)  # 3.8 GB: gone as soon as the module is done, not at session end


def _check_free_disk(path: Path, needed: float) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise RuntimeError(
            f"this test writes a {needed / 1e9:.1f} GB checkpoint under {path}, which has only {free / 1e9:.1f} GB "
            "free: free disk space (or point TMPDIR / pytest's --basetemp at a larger disk)"
        )


# Each backend and each weight source once (CI time): ZeRO-3 through zero.Init with the seeded init,
# FSDP2 from meta with the multi-shard pretrained reader.  The two other pairs share that code and were
# measured too (docs/training_at_scale.md): fsdp2/init 0.52 x, zero3/pretrained 0.51-0.52 x.
@pytest.mark.parametrize("source,backend", [("init", "zero3"), ("pretrained", "fsdp2")])
def test_construction_memory(tmp_path, request, monkeypatch, backend, source):
    if source == "init":
        model = {"config": BIG, "tokenizer": "char:product", "attn_implementation": "sdpa"}
    else:
        model = {"name_or_path": str(request.getfixturevalue("pretrained")), "attn_implementation": "sdpa"}
    records, params = _measure(tmp_path, model, backend, monkeypatch)
    full = 4 * params  # the fp32 model
    assert 0.95e9 < params < 1.1e9
    rises = [r["peak"] - r["before"] for r in records]
    print(
        f"{backend} {source}: {params / 1e9:.2f}B params, full {full / 2**30:.2f} GiB; per-rank rise "
        + ", ".join(f"{x / 2**30:.2f} GiB ({x / full:.2f} x)" for x in rises)
    )
    for rank, rise in enumerate(rises):
        assert rise < 0.6 * full, f"rank {rank} rose by {rise / full:.2f} x the full model while building it"
    assert sum(r["local_numel"] for r in records) >= params  # the shards cover the model
    estimate = _plan_estimate(model, backend)
    print(f"  plan: {estimate / 2**30:.2f} GiB per rank vs measured max {max(rises) / 2**30:.2f} GiB")
    assert abs(estimate - max(rises)) <= 0.25 * max(rises), (estimate, rises)
