"""``model.lora`` trained for real on 2 gloo ranks (recall_dist/train/lora.py and the two backends), against
references of their own:

- the adapters' gradients of the first two steps (the first with B = 0, where only B has a gradient; the
  second after an update, where A has one too), under FSDP2 (untied head, ``lm_head`` adapted: the widened
  head matmul) and under ZeRO-3 (tied embeddings, the default projections), equal those of a one-process
  ``peft.get_peft_model`` over ``AutoModelForCausalLM.from_pretrained`` with a plain full-logits c-Div loss
  over both ranks' batches (relative 1e-5);
- the frozen base equals the pretrained weights bit for bit after training, and the optimizer holds state
  for the adapters only;
- ``final/`` as a peft adapter directory: ``PeftModel.from_pretrained(base, final)`` gives the trained
  model's logits; the merged export equals ``W + alpha / r * B A`` computed here, and loads with
  ``AutoModelForCausalLM``;
- a resume (2 ranks, and 1 rank) gives the losses of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.metrics_log import read_headers, read_metrics
from tests.train.helpers import build, tiny_config_dict
from tests.train.test_scale import write_pretrained

pytestmark = pytest.mark.slow

WORLD = 2
ALPHA = 1.4  # TINY's c-Div
CASES = {
    # untied head, lm_head adapted too (the loss head's widened matmul), FSDP2, activation checkpointing
    "fsdp2": ({"name": "fsdp2"}, False, ["q_proj", "v_proj", "down_proj", "lm_head"], {"gradient_checkpointing": True}),
    # tied embeddings (the head is embed_tokens.weight, frozen), the default projections, ZeRO-3
    "zero3-tied": ({"name": "deepspeed", "zero_stage": 3}, True, None, {}),
}


def _lora(targets) -> dict:
    lora = {"r": 4, "alpha": 8.0, "dropout": 0.0}  # no dropout: the reference sees the same forward
    if targets is not None:
        lora["target_modules"] = targets
    return lora


def _config(out: Path, pre: Path, backend: dict, targets, **train) -> dict:
    model = {"name_or_path": str(pre), "attn_implementation": "sdpa", "lora": _lora(targets)}
    train = {"micro_batch_size": 4, "global_batch_size": 8, **train}
    return tiny_config_dict(out, model=model, backend=backend, train=train)


# ---------------------------------------------------------------- gradients, frozen base, export


def _recorded(data_iter, into: list):
    while True:
        batch = next(data_iter)
        into.append({k: v.clone() for k, v in batch.items()})
        yield batch


def _optimizer_state_numel(engine) -> int:
    """Elements of optimizer state (Adam's two moments) this rank holds."""
    if hasattr(engine, "optimizer"):  # FSDP2: torch Adam over the local shards
        return sum(t.numel() for s in engine.optimizer.state.values() for k, t in s.items() if k != "step")
    opt = engine.ds.optimizer  # ZeRO-3: the fp32 partitions of the trainable groups, moments alike
    return 2 * sum(t.numel() for t in opt.fp32_partitioned_groups_flat)


def _train_worker(data: dict, result: str, final: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.export import export_from_engine
    from recall_dist.train.lora import parameter_split
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    tokenizer = validate_resources(cfg)
    run = setup(cfg, tokenizer, init_distributed())
    record = {"params": [dict(run.engine.full_parameters())], "grads": [], "batches": []}
    data_iter = endless(run.batches)
    for _ in range(2):
        mine: list = []

        def capture(grad_scale, stats):
            record["grads"].append({k: v * grad_scale for k, v in run.engine.full_gradients().items()})

        train_step(run, _recorded(data_iter, mine), before_update=capture)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        record["batches"].append([b for rank in gathered for b in rank])
        record["params"].append(dict(run.engine.full_parameters()))
    state = torch.tensor([_optimizer_state_numel(run.engine)])
    dist.all_reduce(state)
    record["state_numel"] = int(state)
    record["split"] = parameter_split(run.engine.module.model)
    lora = cfg.model.lora
    export_from_engine(run.engine, tokenizer, Path(final, "adapter"), dist.get_rank(), lora=lora)
    merged = dataclasses.replace(lora, merge_on_export=True)
    export_from_engine(run.engine, tokenizer, Path(final, "merged"), dist.get_rank(), lora=merged)
    if dist.get_rank() == 0:
        torch.save(record, result)


def _peft_reference(pre: Path, targets, adapters: dict):
    """``peft.get_peft_model`` over Hugging Face's own load of the base, with the adapters' values set
    from ``adapters`` (trainer names: ``model.layers.0...lora_A.default.weight``)."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32)
    lora = _lora(targets)
    config = peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=0.0,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(adapters[name.removeprefix("base_model.model.")])
    return model


def _global_cdiv(model, batches: list[dict]) -> torch.Tensor:
    """c-Div over every rank's micro-batch at once, from full logits: w = exp((alpha - 1) l) detached,
    L = sum w l / sum w over all valid shifted targets (README "How the losses work")."""
    nll = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:].reshape(-1)
        logp = torch.log_softmax(logits[:, :-1].float().reshape(-1, logits.shape[-1]), dim=-1)
        valid = target != -100
        nll.append(-logp[valid].gather(1, target[valid].unsqueeze(1)).squeeze(1))
    nll = torch.cat(nll)
    w = torch.exp((ALPHA - 1.0) * nll.detach())
    return (w * nll).sum() / w.sum()


def _assert_close(got: torch.Tensor, ref: torch.Tensor, where: str) -> None:
    scale = max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{where}: {m}")


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    backend, tied, targets, train = CASES[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    pre = write_pretrained(root / "pre", seed=5, tie_word_embeddings=tied)
    data = _config(root / "run", pre, backend, targets, **train)
    run_distributed_test(_train_worker, WORLD, data, str(root / "record.pt"), str(root / "final"), timeout=1200)
    return request.param, pre, targets, torch.load(root / "record.pt"), root / "final"


def test_adapter_gradients_equal_one_process_peft(trained):
    label, pre, targets, record, _ = trained
    for step in range(2):
        adapters = {k: v for k, v in record["params"][step].items() if "lora_" in k}
        reference = _peft_reference(pre, targets, adapters)
        _global_cdiv(reference, record["batches"][step]).backward()
        expected = {
            "model." + n.removeprefix("base_model.model."): p.grad
            for n, p in reference.named_parameters()
            if p.requires_grad
        }
        got = record["grads"][step]
        assert sorted(got) == sorted(expected), label  # gradients exist for the adapters only
        for name, ref in expected.items():
            if step == 0 and ".lora_A." in name:
                assert ref.abs().max() == 0 and got[name].abs().max() == 0, name  # B = 0: dL/dA = 0
                continue
            assert ref.abs().max() > 0, name
            _assert_close(got[name], ref, f"{label} step {step + 1} {name}")
    if label == "fsdp2":  # the head's adapter trained through the widened matmul
        assert any("lm_head.lora_B" in n for n in record["grads"][0])


def test_frozen_base_bit_identical_and_state_for_adapters_only(trained):
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import base_parameter_name, is_adapter_parameter

    label, pre, _, record, _ = trained
    pretrained = dict(AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32).named_parameters())
    final = record["params"][-1]
    base = {n: t for n, t in final.items() if not is_adapter_parameter(n)}
    assert {base_parameter_name(n) for n in base} == set(pretrained), label
    for name, tensor in base.items():
        assert torch.equal(tensor, pretrained[base_parameter_name(name)]), f"{label}: {name} changed"
    moved = [n for n in final if is_adapter_parameter(n) and not torch.equal(final[n], record["params"][0][n])]
    assert moved, f"{label}: no adapter changed"
    trainable, frozen = record["split"]
    assert trainable == sum(t.numel() for n, t in final.items() if is_adapter_parameter(n))
    # Adam's two moments of the adapters (ZeRO pads its partitions a little), nothing of the base.
    assert 2 * trainable <= record["state_numel"] < 2 * trainable + frozen // 4, (label, record["state_numel"])


def test_exported_adapter_loads_with_peft_and_gives_the_trained_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    label, pre, targets, record, final = trained
    adapter = final / "adapter"
    assert (adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()
    assert not (adapter / "config.json").exists()  # not a full model
    trained_params = record["params"][-1]
    expected = _peft_reference(pre, targets, {k: v for k, v in trained_params.items() if "lora_" in k})
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32), adapter)
    batch = record["batches"][0][0]
    with torch.no_grad():
        want = expected(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32)(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-4, f"{label}: the adapter changes nothing (test would be vacuous)"


def test_merged_export_is_base_plus_adapter(trained):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import base_parameter_name

    label, _, _, record, final = trained
    params = record["params"][-1]
    scaling = 8.0 / 4
    expected = {}
    for name, tensor in params.items():
        if ".lora_" in name:
            continue
        module = name.removesuffix(".base_layer.weight")
        if module != name:  # W + alpha / r * B A, computed here
            a, b = params[f"{module}.lora_A.default.weight"], params[f"{module}.lora_B.default.weight"]
            tensor = tensor + scaling * (b @ a)
        expected[base_parameter_name(name)] = tensor
    written = load_file(final / "merged" / "model.safetensors")
    assert sorted(written) == sorted(expected), label
    for name, tensor in expected.items():
        _assert_close(written[name], tensor, f"{label} merged {name}")
    model = AutoModelForCausalLM.from_pretrained(final / "merged", dtype=torch.float32)
    state = model.state_dict()
    for name in expected:
        assert torch.equal(state[name], written[name]), name


# ---------------------------------------------------------------- bf16 base at rest


def _bf16_worker(data: dict, result: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    run = setup(cfg, validate_resources(cfg), init_distributed())
    dtypes = {n: p.dtype for n, p in run.engine.module.model.named_parameters()}  # this rank's shards
    data_iter = endless(run.batches)
    losses = [train_step(run, data_iter)["loss"] for _ in range(3)]
    params = dict(run.engine.full_parameters())
    if dist.get_rank() == 0:
        torch.save({"dtypes": dtypes, "losses": losses, "params": params}, result)


def test_fsdp2_keeps_a_bf16_base_in_bf16_and_trains_fp32_adapters(tmp_path):
    """model.dtype bfloat16: the frozen base is sharded in bf16 (half the bytes of fp32 masters), the adapters
    in fp32, in the same per-layer FSDP2 units (mixed dtypes); the base comes out bit-identical to the
    pretrained weights cast to bf16, the loss goes down."""
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import base_parameter_name, is_adapter_parameter

    pre = write_pretrained(tmp_path / "pre", seed=5)
    data = _config(tmp_path / "run", pre, {"name": "fsdp2"}, ["q_proj", "up_proj"])
    data["model"]["dtype"] = "bfloat16"
    data["optim"]["lr"] = 1e-2
    run_distributed_test(_bf16_worker, WORLD, data, str(tmp_path / "r.pt"), timeout=1200)
    got = torch.load(tmp_path / "r.pt")
    for name, dtype in got["dtypes"].items():
        assert dtype == (torch.float32 if is_adapter_parameter(name) else torch.bfloat16), name
    pretrained = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32).state_dict()
    for name, tensor in got["params"].items():
        if not is_adapter_parameter(name):
            assert torch.equal(tensor, pretrained[base_parameter_name(name)].bfloat16().float()), name
    assert got["losses"][-1] < got["losses"][0], got["losses"]


# ---------------------------------------------------------------- resume


def _run_worker(data: dict) -> None:
    from recall_dist.train.trainer import run_training

    run_training(build(data))


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


RESUME_BACKENDS = {
    "fsdp2": {"name": "fsdp2"},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
}


def check_resume_on_2_and_1_ranks(tmp_path: Path, backend: dict, make_config) -> tuple[Path, dict]:
    """A 4-step run, and the same run cut at step 2 and resumed on 2 and on 1 rank(s): the resumed steps'
    losses equal the uninterrupted run's (rel 1e-5) and the checkpoint holds the adapters only.
    ``make_config(out, pre, backend, targets, **train)`` builds each run's config.  Returns the pretrained
    model and the adapter of the uninterrupted run's ``final/`` (its last checkpoint: ``_exports``)."""
    pre = write_pretrained(tmp_path / "pre", seed=5, tie_word_embeddings=True)  # the head: a second name
    steps, half = 4, 2
    targets = ["q_proj", "v_proj"]
    whole = make_config(tmp_path / "whole", pre, backend, targets, max_steps=steps, export_final=True)
    run_distributed_test(_run_worker, WORLD, whole, timeout=1200)
    baseline = _losses(tmp_path / "whole")
    assert sorted(baseline) == list(range(1, steps + 1))

    first = make_config(tmp_path / "first", pre, backend, targets, max_steps=half)
    run_distributed_test(_run_worker, WORLD, first, timeout=1200)
    shutil.copytree(tmp_path / "first", tmp_path / "other")
    for name, world in (("first", WORLD), ("other", 1)):
        resumed = make_config(tmp_path / name, pre, backend, targets, max_steps=steps)
        run_distributed_test(_run_worker, world, resumed, timeout=1200)
        losses = _losses(tmp_path / name)
        assert sorted(losses) == list(range(1, steps + 1)), (name, losses)
        assert [h["start_step"] for h in read_headers(tmp_path / name)] == [0, half], name  # resumed, not restarted
        for step in range(half + 1, steps + 1):
            assert losses[step] == pytest.approx(baseline[step], rel=1e-5), (name, world, step, losses, baseline)
        assert losses[half + 1] != pytest.approx(losses[half], rel=1e-6)  # the steps really differ

    engine = tmp_path / "other" / "checkpoints" / f"step_{half:08d}" / "engine"
    stored = _checkpointed_parameters(engine, backend["name"])
    assert stored and all(".lora_" in name for name in stored), stored  # the adapters only, no base
    return pre, exported_adapter_and_merged(tmp_path, tmp_path / "whole" / "checkpoints" / f"step_{steps:08d}")


def exported_adapter_and_merged(tmp_path: Path, checkpoint: Path) -> tuple[dict, dict]:
    """``export_hf`` of ``checkpoint`` writes the adapter the run's own final/ holds (asserted); returns that
    adapter and the state dict of the merged model ``export_hf`` writes with ``merge_on_export`` in the
    checkpoint's config, for the caller to check against its own reference."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from recall_dist.train.export import export_hf
    from recall_dist.train.lora import ADAPTER_WEIGHTS

    final = load_file(tmp_path / "whole" / "final" / ADAPTER_WEIGHTS)
    offline = load_file(export_hf(checkpoint, tmp_path / "offline") / ADAPTER_WEIGHTS)
    assert sorted(offline) == sorted(final) and final
    for key, tensor in final.items():
        assert torch.equal(offline[key], tensor), key

    merging = tmp_path / "merging" / checkpoint.name
    shutil.copytree(checkpoint, merging)
    config = yaml.safe_load((merging / "config.yaml").read_text())
    config["model"]["lora"]["merge_on_export"] = True
    (merging / "config.yaml").write_text(yaml.safe_dump(config))
    merged = AutoModelForCausalLM.from_pretrained(export_hf(merging, tmp_path / "merged"), dtype=torch.float32)
    return final, merged.state_dict()


@pytest.mark.parametrize("backend", list(RESUME_BACKENDS.values()), ids=list(RESUME_BACKENDS))
def test_resume_continues_the_same_losses_on_2_and_1_ranks(tmp_path, backend):
    from transformers import AutoModelForCausalLM

    pre, (final, state) = check_resume_on_2_and_1_ranks(tmp_path, backend, _config)
    # the merged export: the pretrained base + alpha / r * B A
    for name, weight in AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32).state_dict().items():
        module = name.removesuffix(".weight")
        a = final.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            weight = weight + 8.0 / 4 * (final[f"base_model.model.{module}.lora_B.weight"] @ a)
        _assert_close(state[name], weight, f"offline merged {name}")


def _checkpointed_parameters(engine: Path, backend: str) -> list[str]:
    """The model parameters a checkpoint's ``engine/`` holds, read with the backend's own reader."""
    if backend == "fsdp2":
        import torch.distributed.checkpoint as dcp

        keys = dcp.FileSystemReader(str(engine)).read_metadata().state_dict_metadata
        return [k for k in keys if k.startswith("model.")]
    names: set[str] = set()  # mp_rank_00_model_states.pt (ZeRO-2) or one zero_pp_rank_*_model_states.pt per rank
    for path in engine.glob("engine/*model_states.pt"):
        names.update(torch.load(path, weights_only=False)["module"] or {})
    return sorted(names)
