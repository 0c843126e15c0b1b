"""Scale mechanics on CPU (gloo, real DeepSpeed and FSDP2): fp32 master weights under bf16 compute, the
same initial weights on any number of ranks, pretrained sharded safetensors, resuming on another number of
ranks, an atomic streamed export, packed examples kept apart, and construction that never holds the full
model on one rank (tests/train/test_construction_memory.py measures that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recall_dist.configtree import load_yaml
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.config import MODEL_PRESET_DIR
from recall_dist.train.metrics_log import read_metrics
from tests.train.helpers import build, reference_loss, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def _tiny_model(**config) -> dict:
    model = load_yaml(MODEL_PRESET_DIR / "tiny-llama.yaml")
    model["config"].update(config)
    return model


# ---------------------------------------------------------------- packed examples do not see each other


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_isolation(attn):
    """Per-example token NLLs of a packed batch (several examples per row, attention mask dropped as the
    trainer does, position_ids restarting per example) equal those of each example run alone."""
    from recall_dist.data.dataset import build_dataset
    from recall_dist.data.loader import DistributedBatchIterator
    from recall_dist.train.models import build_model
    from recall_dist.train.resources import validate_resources

    model_dict = _tiny_model()
    model_dict["attn_implementation"] = attn
    cfg = build(tiny_config_dict("unused", model=model_dict))
    tokenizer = validate_resources(cfg)
    examples = build_dataset(cfg.data, tokenizer)[:6]
    model = build_model(cfg.model, seed=3).eval()
    packed = DistributedBatchIterator(examples, 6, shuffle=False, packing=True, max_length=40).collate(examples)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row

    def token_nll(input_ids, position_ids=None, attention_mask=None):
        with torch.no_grad():
            logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).logits
        return torch.nn.functional.cross_entropy(
            logits[0, :-1].double(), input_ids[0, 1:], reduction="none"
        )  # token t+1 predicted at t

    for row in range(packed["input_ids"].shape[0]):
        nll = token_nll(packed["input_ids"][row : row + 1], packed["position_ids"][row : row + 1])
        seq = packed["sequence_ids"][row]
        for example in seq[seq >= 0].unique().tolist():
            where = (seq == example).nonzero().squeeze(1)
            ids = torch.tensor([examples[example]["input_ids"]])
            alone = token_nll(ids)
            torch.testing.assert_close(nll[where[:-1]], alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fp32 master weights under bf16 compute


def _fp32_master_worker(data: dict, result_path: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, step_token_count

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    assert cfg.backend.bf16 is True  # the preset's bfloat16 asks for bf16 compute
    before = dict(run.engine.full_parameters())
    micro = [next(endless(run.batches))]
    with run.loss.optimizer_step(step_token_count(micro, run.ctx.dp_group)) as step:
        loss, _ = run.engine.forward(micro[0])
        run.engine.backward(loss)
        grads = run.engine.full_gradients()
        run.engine.step(grad_scale=step.gradient_scale())
    after = dict(run.engine.full_parameters())
    if dist.get_rank() == 0:
        dtypes = sorted({str(p.dtype) for p in run.engine.module.parameters()})
        torch.save({"before": before, "after": after, "grads": grads, "dtypes": dtypes}, result_path)


def test_fsdp2_fp32_master(tmp_path):
    """bf16 preset, FSDP2, lr 1e-6, one Adam step: the sharded fp32 masters move wherever the gradient is
    non-zero (an update of ~1e-6 on weights of ~0.02 rounds to nothing in bf16: that was ~2% moving)."""
    data = tiny_config_dict(
        tmp_path / "run",
        model={**_tiny_model(), "dtype": "bfloat16"},
        backend={"name": "fsdp2", "bf16": None},
        optim={"lr": 1e-6},
        train={"micro_batch_size": 8},
    )
    result = tmp_path / "result.pt"
    run_distributed_test(_fp32_master_worker, WORLD, data, str(result))
    got = torch.load(result)
    assert got["dtypes"] == ["torch.float32"]  # the sharded parameters are the masters
    moved = total = 0
    for name, before in got["before"].items():
        grad = got["grads"][f"model.{name}"]
        active = grad != 0
        moved += int(((got["after"][name] != before) & active).sum())
        total += int(active.sum())
    print(f"fp32 masters: {moved}/{total} = {moved / total:.4f} of the weights with a gradient moved")
    assert total > 0 and moved / total > 0.9, f"only {moved}/{total} of the weights with a gradient moved"


# ---------------------------------------------------------------- first-step gradients, every backend

BACKENDS = [
    ({"name": "deepspeed", "zero_stage": 2}, False, "zero2"),
    ({"name": "deepspeed", "zero_stage": 3}, False, "zero3"),
    ({"name": "fsdp2"}, False, "fsdp2"),
    # Tied embeddings: the head weight is embed_tokens.weight, used outside lm_head's forward.
    ({"name": "deepspeed", "zero_stage": 3}, True, "zero3-tied"),
    ({"name": "fsdp2"}, True, "fsdp2-tied"),
]


def _first_step_worker(data: dict, result_path: str, steps: int) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    data_iter = endless(run.batches)
    loss, _ = run.engine.forward(next(data_iter))  # outside an optimizer step: the call is its own step
    run.engine.backward(loss)
    grads = run.engine.full_gradients()
    run.engine.step()
    nll = [train_step(run, data_iter)["nll"] for _ in range(steps)]
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "nll": nll}, result_path)


def _reference_grads(data: dict) -> dict[str, torch.Tensor]:
    """One process, micro-batch = the global batch, full logits, from the model the config describes."""
    from recall_dist.data.dataset import build_dataset
    from recall_dist.data.loader import DistributedBatchIterator
    from recall_dist.train.models import build_model
    from recall_dist.train.resources import validate_resources

    cfg = build(data)
    tokenizer = validate_resources(cfg)
    dataset = build_dataset(cfg.data, tokenizer)
    batches = DistributedBatchIterator(dataset, cfg.train.micro_batch_size * WORLD, 0, 1, seed=cfg.train.seed)
    if cfg.model.name_or_path is not None:  # Hugging Face's own loader: an independent reference
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    else:
        model = build_model(cfg.model, seed=cfg.train.seed)  # the same seeded weights, one process
    reference_loss(model, next(iter(batches)), cfg.loss.params.get("alpha")).backward()
    return {f"model.{name}": p.grad for name, p in model.named_parameters()}


def _check_grads(got: dict, expected: dict, label: str) -> None:
    assert set(got) == set(expected), label
    for name, ref in expected.items():
        torch.testing.assert_close(
            got[name], ref, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{label} {name}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend,tied,label", BACKENDS, ids=[c[2] for c in BACKENDS])
def test_first_step_gradients(tmp_path, backend, tied, label):
    """2 ranks, each backend building its own (sharded / partitioned) model from the seed: the first step's
    gradients equal a one-process model built from the same seed, and the NLL goes down."""
    data = tiny_config_dict(tmp_path / "run", backend=backend, model=_tiny_model(tie_word_embeddings=tied))
    result = tmp_path / "result.pt"
    run_distributed_test(_first_step_worker, WORLD, data, str(result), 20)
    got = torch.load(result)
    expected = _reference_grads(data)
    assert ("model.lm_head.weight" in expected) is not tied
    _check_grads(got["grads"], expected, label)
    nll = got["nll"]
    assert sum(nll[-5:]) / 5 < sum(nll[:5]) / 5 - 0.1, f"{label}: nll did not go down: {nll}"


# ---------------------------------------------------------------- pretrained, sharded safetensors


def write_pretrained(directory: Path, seed: int = 7, **config) -> Path:
    """A tiny Llama saved by Hugging Face in several safetensors shards, with the char tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recall_dist.data import load_tokenizer

    params = dict(_tiny_model(**config)["config"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    model.save_pretrained(directory, max_shard_size="24KB")
    load_tokenizer("char:product").save_pretrained(directory)
    return directory


def test_written_checkpoint_has_several_shards(tmp_path):
    directory = write_pretrained(tmp_path / "pre")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS[:3], ids=[c[2] for c in BACKENDS[:3]])
def test_pretrained_sharded_load(tmp_path, backend):
    """Every backend reads only its rows of a multi-shard checkpoint: the first step's gradients (and so
    the first loss) equal the one-process ``from_pretrained`` model's."""
    backend_cfg, _, label = backend
    pre = write_pretrained(tmp_path / "pre")
    model = {"name_or_path": str(pre), "attn_implementation": "sdpa"}
    data = tiny_config_dict(tmp_path / "run", backend=backend_cfg, model=model)
    result = tmp_path / "result.pt"
    run_distributed_test(_first_step_worker, WORLD, data, str(result), 0)
    _check_grads(torch.load(result)["grads"], _reference_grads(data), label)


# ---------------------------------------------------------------- the same initial model on any world size


def _init_worker(data: dict, result_path: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import setup

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    params = dict(run.engine.full_parameters())
    if dist.get_rank() == 0:
        torch.save(params, result_path)


@pytest.mark.slow
def test_initial_weights_do_not_depend_on_world_size_or_backend(tmp_path):
    """Seeded initialisation: 3 FSDP2 ranks (uneven shards), 2 ZeRO-3 ranks and one process give the same
    weights, and they follow Hugging Face's initialisation (N(0, initializer_range), norms 1)."""
    from recall_dist.train.models import build_model

    model = _tiny_model(hidden_size=40)  # 40 rows split 14 + 14 + 12 over 3 ranks' dim-0 shards
    alone = build_model(build(tiny_config_dict("unused", model=model)).model, seed=0)
    for backend, world in (({"name": "fsdp2"}, 3), ({"name": "deepspeed", "zero_stage": 3}, 2)):
        data = tiny_config_dict(tmp_path / "run", backend=backend, model=model)
        result = tmp_path / "init.pt"
        run_distributed_test(_init_worker, world, data, str(result))
        got = torch.load(result)
        for name, p in alone.named_parameters():
            torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=0, msg=f"{backend} x{world} {name}")
    std = alone.config.initializer_range
    for name, p in alone.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        else:
            values = p.detach()[1:] if "embed_tokens" in name else p.detach()  # row 0 is the padding token
            assert abs(values.std().item() - std) < 0.2 * std, name
    other = build_model(build(tiny_config_dict("unused", model=model)).model, seed=1)
    assert not torch.equal(other.lm_head.weight, alone.lm_head.weight)


# ---------------------------------------------------------------- resume on another number of ranks


def _train_cli(config: Path, out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "recall_dist", "train", str(config)]
    cmd += [f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


RESUMES = [  # each backend once, both directions (FSDP2 1->2 is the same DCP resharding as 2->1)
    ({"name": "fsdp2"}, 2, 1),
    ({"name": "deepspeed", "zero_stage": 3}, 2, 1),
    ({"name": "deepspeed", "zero_stage": 2}, 1, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,first,second", RESUMES, ids=[f"{b['name']}{b.get('zero_stage', '')}-{f}to{s}" for b, f, s in RESUMES]
)
def test_resume_other_world_size(tmp_path, backend, first, second):
    """A run checkpointed at step 2 by ``first`` ranks and resumed by ``second`` ranks (same 16-example
    optimizer step: 2 ranks x 8, or 1 rank x 8 x 2 accumulation) logs the uninterrupted run's losses and
    gradient norms -- truncr included, so the truncation buffer continues too."""
    data = tiny_config_dict(
        "unused",
        backend=backend,
        loss={"name": "truncr", "params": {"drop": 0.5, "granularity": "sequence", "buffer_size": 64, "min_count": 8}},
        train={"max_steps": 4, "checkpoint_every": 2, "global_batch_size": 16, "micro_batch_size": 8},
    )
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(data))
    out = tmp_path / "run"
    _train_cli(config, out, first)
    reference = read_metrics(out)
    for path in (out / "checkpoints" / "step_00000004", out / "final"):
        if path.exists():
            subprocess.run(["rm", "-rf", str(path)], check=True)
    proc = _train_cli(config, out, second, "train.resume=auto")
    assert "resumed from" in proc.stderr and "step_00000002" in proc.stderr
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ref, got in zip(reference[2:], resumed[2:], strict=True):
        assert ("grad_norm" in got) == ("grad_norm" in ref), (ref, got)  # a skipped step (no kept token) logs none
        for key in ("loss", "nll", "grad_norm", "kept_fraction", "tau"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (key, ref, got)


# ---------------------------------------------------------------- the export is atomic


def _export_until_killed(out_dir: str, kill_after: int) -> None:
    """Export a tiny model, SIGKILLing this process after ``kill_after`` parameters were streamed."""
    import signal

    from recall_dist.train.export import write_hf_directory
    from recall_dist.train.models import build_model

    model = build_model(build(tiny_config_dict("unused")).model, seed=5)

    def parameters():
        for i, (name, p) in enumerate(model.named_parameters()):
            if i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            yield name, p.detach()

    write_hf_directory(model.config, parameters(), None, out_dir, torch.float32, max_shard_bytes=4096)


def _detached(model):
    return ((name, p.detach()) for name, p in model.named_parameters())


def test_export_atomic(tmp_path):
    """A kill while the new export streams (shards half written) leaves the previous ``final/`` intact and
    loadable; the next export replaces it; a crash between the two renames is repaired by the next export."""
    from transformers import AutoModelForCausalLM

    from recall_dist.train.export import write_hf_directory
    from recall_dist.train.models import build_model

    final = tmp_path / "final"
    old = build_model(build(tiny_config_dict("unused")).model, seed=1)
    write_hf_directory(old.config, _detached(old), None, final, torch.float32, max_shard_bytes=4096)
    assert len(list(final.glob("model-*.safetensors"))) > 2
    code = "from tests.train.test_scale import _export_until_killed as f; import sys; f(sys.argv[1], 7)"
    proc = subprocess.run([sys.executable, "-c", code, str(final)], cwd=REPO, check=False)
    assert proc.returncode == -9
    assert (tmp_path / ".tmp-final").is_dir()  # the interrupted export's partial files
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for (name, a), (_, b) in zip(old.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # Crash between the renames: final/ moved aside, new one not yet in place.
    os.rename(final, tmp_path / ".old-final")
    new = build_model(build(tiny_config_dict("unused")).model, seed=2)
    write_hf_directory(new.config, _detached(new), None, final, torch.float32, max_shard_bytes=4096)
    assert not (tmp_path / ".old-final").exists() and not (tmp_path / ".tmp-final").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert torch.equal(loaded.lm_head.weight, new.lm_head.weight)


def test_export_streams_one_shard_at_a_time(tmp_path):
    """The writer holds at most one shard plus one tensor: shards are written as they fill, in bf16 when
    the model's at-rest dtype is bfloat16, and from_pretrained reads them back."""
    from transformers import AutoModelForCausalLM

    from recall_dist.train.export import ShardedSafetensorsWriter, write_hf_directory
    from recall_dist.train.models import build_model

    model = build_model(build(tiny_config_dict("unused")).model, seed=4)
    peak = []
    original = ShardedSafetensorsWriter.add

    def add(self, name, tensor):
        original(self, name, tensor)
        peak.append(self.pending_bytes)

    ShardedSafetensorsWriter.add = add
    try:
        write_hf_directory(model.config, _detached(model), None, tmp_path / "out", torch.bfloat16, max_shard_bytes=8192)
    finally:
        ShardedSafetensorsWriter.add = original
    largest = max(p.numel() * 2 for p in model.parameters())
    assert max(peak) <= 8192 + largest
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), model.lm_head.weight.detach().to(torch.bfloat16).float())
