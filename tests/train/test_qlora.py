"""QLoRA (``model.lora.quantize: 4bit``, recall_dist/train/qlora.py) with the real bitsandbytes and peft, on CPU
(bitsandbytes >= 0.48 runs NF4 there) and gloo, against references built by the libraries themselves:

- the reference is ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4,
  double quantisation))`` (transformers quantises the decoder's linear layers, not ``lm_head``) wrapped by
  ``peft.get_peft_model`` (peft's own 4-bit LoRA layer): our 4-bit bytes equal its bytes, our logits and
  adapter gradients equal its (relative 1e-5);
- 2-rank FSDP2 (untied head, ``lm_head`` adapted, activation checkpointing) and 2-rank ZeRO-2 (tied
  embeddings, the default projections): the adapters' gradients of the first two steps equal the reference's
  on both ranks' batches (relative 1e-5); the 4-bit base is bit-identical after training, the same on both
  ranks; the optimizer holds state for the adapters only; ``final/`` loads with ``PeftModel`` over the
  reference and gives the trained logits; the merged export is ``W_deq + alpha / r * B A``;
- a resume gives the losses of an uninterrupted run (2 ranks and 1 rank), from a checkpoint of adapters only;
- the refusals (ZeRO-3; bitsandbytes missing; too old for CPU) are one line naming ``model.lora.quantize``;
- ``recall-dist plan`` counts the 4-bit base as the bytes bitsandbytes allocates.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch

from recall_dist.configtree import ConfigError
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.train.qlora import import_bitsandbytes
from tests.train.helpers import build, reference_loss, tiny_config_dict
from tests.train.test_lora_distributed import (
    WORLD,
    _assert_close,
    _config,
    _global_cdiv,
    _recorded,
    check_resume_on_2_and_1_ranks,
)
from tests.train.test_scale import write_pretrained

bnb = import_bitsandbytes()
pytestmark = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALING = 8.0 / 4  # alpha / r of test_lora_distributed's adapters


def _qlora_config(out: Path, pre: Path, backend: dict, targets, **train) -> dict:
    data = _config(out, pre, backend, targets, **train)
    data["model"]["lora"]["quantize"] = "4bit"
    return data


def _four_bit_base(pre: Path):
    """transformers' own 4-bit load of the pretrained model (NF4, double quantisation, fp32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(pre, quantization_config=quant, dtype=torch.float32, device_map="cpu")


def _reference(pre: Path, targets, adapters: dict | None = None, seed: int = 0):
    """peft's own QLoRA: transformers' 4-bit load of the pretrained base (NF4, double quantisation, fp32
    compute), ``peft.get_peft_model`` over it; adapters from ``adapters`` (trainer names) or random (B too,
    so that A has a gradient).  In train mode (no dropout anywhere): bitsandbytes repacks CPU weights for
    inference in eval mode."""
    import peft

    base = _four_bit_base(pre)
    config = peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets or DEFAULT_TARGETS)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.")
                p.copy_(adapters[key] if adapters is not None else 0.1 * torch.randn(p.shape, generator=generator))
    return model.train()


def _four_bit_bytes_of(model) -> dict[str, torch.Tensor]:
    """The packed weight and absmax of every 4-bit layer, under its Hugging Face module name."""
    from recall_dist.train.lora import base_module_name

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = base_module_name(name.removeprefix("base_model.model."))
            out[key] = (module.weight.data.clone(), module.weight.quant_state.absmax.clone())
    return out


# ---------------------------------------------------------------- one process


def test_built_model_equals_peft_qlora_reference(tmp_path):
    """``build_model`` with ``quantize: 4bit``: the same 4-bit bytes as transformers' 4-bit load, peft's 4-bit
    LoRA layers on them, the head in full precision, and (with the same adapter values) the logits and the
    adapters' gradients of the reference (relative 1e-5)."""
    from recall_dist.train.lora import is_adapter_parameter, parameter_split
    from recall_dist.train.models import build_model

    pre = write_pretrained(tmp_path / "pre", seed=5)
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    data = _qlora_config(tmp_path / "run", pre, {"name": "fsdp2"}, targets)
    ours = build_model(build(data).model).train()
    reference = _reference(pre, targets)
    assert parameter_split(ours) == parameter_split(build_model(build(data).model, meta=True))  # not packed bytes

    q_proj = ours.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb" and isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(ours.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)  # not adapted: 4-bit too
    assert type(ours.lm_head.base_layer) is torch.nn.Linear and ours.lm_head.base_layer.weight.dtype == torch.float32
    mine, theirs = _four_bit_bytes_of(ours), _four_bit_bytes_of(reference)
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 7
    for name in mine:
        assert torch.equal(mine[name][0], theirs[name][0]) and torch.equal(mine[name][1], theirs[name][1]), name

    with torch.no_grad():
        for name, p in ours.named_parameters():
            if is_adapter_parameter(name):
                p.copy_(dict(reference.named_parameters())[f"base_model.model.{name}"])
    batch = {"input_ids": torch.randint(3, 13, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    reference_loss(ours, batch, 1.4).backward()
    reference_loss(reference, batch, 1.4).backward()
    ref_grads = {
        n.removeprefix("base_model.model."): p.grad for n, p in reference.named_parameters() if p.requires_grad
    }
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(got) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, name
        _assert_close(got[name], ref, f"one process {name}")

    # Evaluation (eval mode, no gradient): bitsandbytes would repack the CPU weights in place for its
    # inference kernel (and fails on layers this small); ours keep their bytes and give the training logits.
    from recall_dist.train.qlora import four_bit_state

    before = four_bit_state(ours)
    with torch.no_grad():
        train_logits = ours(input_ids=batch["input_ids"]).logits
        eval_logits = ours.eval()(input_ids=batch["input_ids"]).logits
    after = four_bit_state(ours)
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], t) for k, t in before.items())
    torch.testing.assert_close(eval_logits, train_logits, rtol=0, atol=0)


# ---------------------------------------------------------------- 2 ranks: gradients, 4-bit base, export

CASES = {
    "fsdp2": ({"name": "fsdp2"}, False, ["q_proj", "v_proj", "down_proj", "lm_head"], {"gradient_checkpointing": True}),
    "zero2-tied": ({"name": "deepspeed", "zero_stage": 2}, True, None, {}),
}


def _state_numel(engine) -> int:
    """Elements of optimizer state this rank holds (Adam's moments; ZeRO-2's torch Adam over its flat fp32
    partitions)."""
    opt = engine.optimizer if hasattr(engine, "optimizer") else engine.ds.optimizer.optimizer
    return sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")


def _qlora_worker(data: dict, result: str, final: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.export import export_from_engine
    from recall_dist.train.qlora import four_bit_state
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = build(data)
    tokenizer = validate_resources(cfg)
    run = setup(cfg, tokenizer, init_distributed())
    model = run.engine.module.model
    before = four_bit_state(model)
    kinds = {n: (type(p).__name__, tuple(getattr(p, "_local_tensor", p).shape)) for n, p in model.named_parameters()}
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
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, {"before": before, "after": four_bit_state(model)})
    record["four_bit"] = states
    record["kinds"] = kinds
    numel = torch.tensor([_state_numel(run.engine)])
    dist.all_reduce(numel)
    record["state_numel"] = int(numel)
    lora = cfg.model.lora
    export_from_engine(run.engine, tokenizer, Path(final, "adapter"), dist.get_rank(), lora=lora)
    merged = dataclasses.replace(lora, merge_on_export=True)
    export_from_engine(run.engine, tokenizer, Path(final, "merged"), dist.get_rank(), lora=merged)
    if dist.get_rank() == 0:
        torch.save(record, result)


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    backend, tied, targets, train = CASES[request.param]
    root = tmp_path_factory.mktemp(f"qlora-{request.param}")
    pre = write_pretrained(root / "pre", seed=5, tie_word_embeddings=tied)
    data = _qlora_config(root / "run", pre, backend, targets, **train)
    run_distributed_test(_qlora_worker, WORLD, data, str(root / "record.pt"), str(root / "final"), timeout=1200)
    return request.param, pre, targets, torch.load(root / "record.pt", weights_only=False), root / "final"


@pytest.mark.slow
def test_adapter_gradients_equal_peft_qlora_reference(trained):
    label, pre, targets, record, _ = trained
    worst = 0.0
    for step in range(2):
        adapters = {k: v for k, v in record["params"][step].items() if "lora_" in k}
        reference = _reference(pre, targets, adapters)
        _global_cdiv(reference, record["batches"][step]).backward()
        expected = {
            "model." + n.removeprefix("base_model.model."): p.grad
            for n, p in reference.named_parameters()
            if p.requires_grad
        }
        got = record["grads"][step]
        assert sorted(got) == sorted(expected), label  # gradients for the adapters only
        for name, ref in expected.items():
            if step == 0 and ".lora_A." in name:
                assert ref.abs().max() == 0 and got[name].abs().max() == 0, name  # B = 0: dL/dA = 0
                continue
            assert ref.abs().max() > 0, name
            _assert_close(got[name], ref, f"{label} step {step + 1} {name}")
            worst = max(worst, ((got[name] - ref).abs().max() / ref.abs().max()).item())
    print(f"{label}: adapter gradients, max |got - ref| / max |ref| = {worst:.2e}")
    if label == "fsdp2":
        assert any("lm_head.lora_B" in n for n in record["grads"][0])


@pytest.mark.slow
def test_four_bit_base_bit_identical_on_every_rank_and_state_for_adapters_only(trained):
    from recall_dist.train.lora import is_adapter_parameter

    label, pre, targets, record, _ = trained
    states = record["four_bit"]
    assert len(states) == WORLD and states[0]["before"], label
    for rank, state in enumerate(states):  # replicated whole on each rank, untouched by training
        assert sorted(state["after"]) == sorted(states[0]["before"]), (label, rank)
        for key, tensor in states[0]["before"].items():
            assert torch.equal(state["before"][key], tensor), (label, rank, key)
            assert torch.equal(state["after"][key], tensor), (label, rank, key, "changed by training")
    reference = _four_bit_bytes_of(_reference(pre, targets))
    for module, (packed, absmax) in reference.items():
        name = next(k for k in states[0]["after"] if k.startswith(f"{module}.") and k.endswith(".weight"))
        assert torch.equal(states[0]["after"][name], packed), name  # the bytes transformers quantises
        assert torch.equal(states[0]["after"][name.removesuffix("weight") + "absmax"], absmax), name
    final = record["params"][-1]
    moved = [n for n in final if is_adapter_parameter(n) and not torch.equal(final[n], record["params"][0][n])]
    assert moved, label
    for name, (kind, local_shape) in record["kinds"].items():  # what rank 0 holds
        if is_adapter_parameter(name):  # fp32 adapters: sharded per decoder layer (and the root) under FSDP2
            rows, *rest = final[name].shape
            expected = ("DTensor", (-(-rows // WORLD), *rest)) if label == "fsdp2" else ("Parameter", (rows, *rest))
            assert (kind, local_shape) == expected, (label, name)
        elif "_proj." in name:  # a decoder linear's weight: 4-bit (two values a byte), whole on every rank
            assert (kind, local_shape) == ("Params4bit", (final[name].numel() // 2, 1)), (label, name)
    trainable = sum(t.numel() for n, t in final.items() if is_adapter_parameter(n))
    frozen = sum(t.numel() for n, t in final.items() if not is_adapter_parameter(n))
    # Adam's two moments of the adapters (ZeRO pads its partitions a little), nothing of the base.
    assert 2 * trainable <= record["state_numel"] < 2 * trainable + frozen // 4, (label, record["state_numel"])


@pytest.mark.slow
def test_exports_adapter_over_reference_and_merged_dequantised(trained):
    from peft import PeftModel
    from safetensors.torch import load_file

    from recall_dist.train.lora import ADAPTER_WEIGHTS, base_parameter_name

    label, pre, targets, record, final = trained
    trained_params = record["params"][-1]
    adapters = {k: v for k, v in trained_params.items() if "lora_" in k}
    expected = _reference(pre, targets, adapters)
    assert (final / "adapter" / ADAPTER_WEIGHTS).is_file()
    loaded = PeftModel.from_pretrained(_four_bit_base(pre), final / "adapter").train()
    batch = record["batches"][0][0]
    with torch.no_grad():
        want = expected(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # merged: every adapted weight is W_deq + alpha / r * B A, with W_deq the dequantised 4-bit weight
    written = load_file(final / "merged" / "model.safetensors")
    for name, tensor in trained_params.items():
        if ".lora_" in name:
            continue
        module = name.removesuffix(".base_layer.weight")
        if module != name:
            a, b = trained_params[f"{module}.lora_A.default.weight"], trained_params[f"{module}.lora_B.default.weight"]
            tensor = tensor + SCALING * (b @ a)
        _assert_close(written[base_parameter_name(name)], tensor, f"{label} merged {name}")
    deq = bnb.functional.dequantize_4bit(
        expected.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.data,
        expected.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.quant_state,
    )
    a = trained_params["model.layers.0.mlp.down_proj.lora_A.default.weight"]
    b = trained_params["model.layers.0.mlp.down_proj.lora_B.default.weight"]
    _assert_close(written["model.layers.0.mlp.down_proj.weight"], deq + SCALING * (b @ a), f"{label} W_deq")


# ---------------------------------------------------------------- resume


# FSDP2 only: the QLoRA part of a resume (adapters-only state, the base re-quantised from its source) is the
# same code under ZeRO-2, whose LoRA resume tests/train/test_lora_distributed.py covers; a second backend here
# would add about a minute to CI.
@pytest.mark.slow
@pytest.mark.parametrize("backend", [{"name": "fsdp2"}], ids=["fsdp2"])
def test_resume_continues_the_same_losses_on_2_and_1_ranks(tmp_path, backend):
    """Resume as for LoRA (``check_resume_on_2_and_1_ranks``: the checkpoint holds no 4-bit bytes); the merged
    export: every decoder linear is ``W_deq + alpha / r * B A`` (``W_deq`` dequantised from transformers' own
    4-bit load; the unadapted ones ``W_deq``), the rest the pretrained weights."""
    from transformers import AutoModelForCausalLM

    pre, (final, state) = check_resume_on_2_and_1_ranks(tmp_path, backend, _qlora_config)
    four_bit = {n: m for n, m in _four_bit_base(pre).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    pretrained = AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32).state_dict()
    adapted = 0
    for name, weight in pretrained.items():
        module = name.removesuffix(".weight")
        if module in four_bit:
            weight = bnb.functional.dequantize_4bit(four_bit[module].weight.data, four_bit[module].weight.quant_state)
            assert not torch.equal(weight, pretrained[name]), name  # 4 bits lose something: not vacuous
        a = final.get(f"base_model.model.{module}.lora_A.weight")
        if a is not None:
            weight = weight + SCALING * (final[f"base_model.model.{module}.lora_B.weight"] @ a)
            adapted += 1
        _assert_close(state[name], weight, f"offline merged {name}")
    assert adapted == 2 * 2 and len(four_bit) == 2 * 7


# ---------------------------------------------------------------- refusals, the CPU warning


def _tiny(lora: dict, backend: dict | None = None):
    from recall_dist.configtree import load_yaml
    from recall_dist.train.config import MODEL_PRESET_DIR

    model = {**load_yaml(MODEL_PRESET_DIR / "tiny-llama.yaml"), "lora": lora}
    return build(tiny_config_dict("unused", model=model, backend=backend or {"name": "fsdp2"}))


def test_zero3_is_refused_in_one_line():
    from recall_dist.train.resources import validate_resources

    cfg = _tiny({"quantize": "4bit"}, {"name": "deepspeed", "zero_stage": 3})
    with pytest.raises(ConfigError) as info:
        validate_resources(cfg)
    message = str(info.value)
    assert info.value.key == "model.lora.quantize" and "\n" not in message
    assert "ZeRO-3" in message and "backend.name=fsdp2" in message and "backend.zero_stage=2" in message


def test_missing_bitsandbytes_is_refused_in_one_line(monkeypatch):
    from recall_dist.train.lora import check_quantize_supported

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ConfigError) as info:
        check_quantize_supported(_tiny({"quantize": "4bit"}).model.lora)
    assert info.value.key == "model.lora.quantize" and "\n" not in str(info.value)
    assert "pip install bitsandbytes" in str(info.value)


def test_bitsandbytes_without_cpu_backend_is_refused_on_cpu(monkeypatch):
    from recall_dist.train import qlora
    from recall_dist.train.lora import check_quantize_supported

    lora = _tiny({"quantize": "4bit"}).model.lora
    monkeypatch.setattr(qlora, "bitsandbytes_version", lambda: (0, 45))
    with pytest.raises(ConfigError) as info:
        check_quantize_supported(lora, device_type="cpu")
    assert info.value.key == "model.lora.quantize" and "\n" not in str(info.value) and ">= 0.48" in str(info.value)
    check_quantize_supported(lora, device_type="cuda")  # a GPU has its CUDA backend


def test_cpu_runs_with_a_one_line_warning(caplog):
    from recall_dist.train.lora import check_quantize_supported

    with caplog.at_level(logging.WARNING, logger="recall_dist.train.lora"):
        check_quantize_supported(_tiny({"quantize": "4bit"}).model.lora, device_type="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "recall_dist.train.lora"]
    assert len(lines) == 1 and "\n" not in lines[0] and "memory, not time" in lines[0]


def test_importing_bitsandbytes_makes_no_hub_request():
    """In a fresh interpreter where the hub counts as reachable (no HF_HUB_OFFLINE), importing bitsandbytes our
    way (then peft, which imports it too) looks up no host, opens no connection and loads no hub kernel: every
    name lookup and socket connect is recorded (and refused) there.  A bare ``import bitsandbytes`` looks up
    huggingface.co on this CPU (AVX512-BF16) in the same setting."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = """
import socket, sys
attempts = []
def connect(self, address, *args):
    attempts.append(address)
    raise OSError("network refused by the test")
def getaddrinfo(host, port, *args, **kwargs):
    attempts.append((host, port))
    raise socket.gaierror("network refused by the test")
socket.socket.connect = connect
socket.getaddrinfo = getaddrinfo
from recall_dist.train.qlora import import_bitsandbytes
import_bitsandbytes()
import peft
ops = sys.modules["bitsandbytes.backends.cpu.ops"]
print(len(attempts), getattr(ops, "gemm_4bit_forward_kernel", None) is None)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True"], (out.stdout, out.stderr[-2000:])
    assert "kernels-community" not in out.stderr


# ---------------------------------------------------------------- the plan


def test_plan_counts_the_four_bit_bytes_bitsandbytes_allocates():
    """``qlora.four_bit_split`` (the planner's 4-bit bytes) equals the bytes of every tensor bitsandbytes
    allocates for the tiny model's 4-bit base (packed weights, absmax, nested absmax, codes, offsets), and
    the plan shows a 4-bit base row of that size instead of the full-precision one."""
    from recall_dist.train.memory_plan import format_plan, make_plan
    from recall_dist.train.models import build_model, decoder_layers
    from recall_dist.train.qlora import four_bit_split, four_bit_state

    lora = {"r": 4, "quantize": "4bit"}
    cfg = _tiny(lora)
    allocated = sum(t.numel() * t.element_size() for t in four_bit_state(build_model(cfg.model)).values())
    base = build_model(dataclasses.replace(cfg.model, lora=None), meta=True)
    numel, planned, bias = four_bit_split(decoder_layers(base))
    assert numel == 2 * (4 * 32 * 32 + 3 * 32 * 64) and bias == 0
    assert planned == allocated, (planned, allocated)
    print(f"tiny model: {numel} 4-bit weights, planned {planned} B, bitsandbytes allocates {allocated} B")

    plan = make_plan(cfg, 1, 1, device="cpu")
    full = make_plan(_tiny({"r": 4}), 1, 1, device="cpu")
    assert plan.rows["frozen base (4-bit NF4 layers, every rank)"] == planned
    rest = full.frozen_params - numel  # embedding, norms, head: fp32 as under LoRA
    assert plan.rows["frozen base (sharded float32)"] == 4 * rest
    assert full.rows["frozen base (sharded float32)"] == 4 * full.frozen_params
    assert plan.total_bytes < full.total_bytes
    assert plan.four_bit_build_bytes == 4 * numel  # fp32 until quantised
    text = format_plan(plan, cfg, 80.0)
    assert "NF4" in text and "not modelled" not in text


def test_plan_refuses_zero3():
    from recall_dist.train.memory_plan import make_plan

    with pytest.raises(ConfigError) as info:
        make_plan(_tiny({"quantize": "4bit"}, {"name": "deepspeed", "zero_stage": 3}), 1, 2)
    assert info.value.key == "model.lora.quantize"
