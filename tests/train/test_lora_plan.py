"""``recall-dist plan`` under LoRA (train/memory_plan.py): the adapter count in closed form against the
trainable parameters of a real peft model (tiny Llama with GQA and tied embeddings, the converted SmolLM2,
Llama-2-7B's published count), and the per-rank rows of FSDP2 and ZeRO-2/3: gradients and optimizer
states for the adapters only, the frozen base at rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recall_dist.train import memory_plan as plan_cli
from recall_dist.train.config import ModelConfig, load_train_config
from recall_dist.train.lora_plan import lora_parameter_count, lora_targets
from recall_dist.train.models import build_model, count_parameters

peft = pytest.importorskip("peft")

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOLLM2 = Path("~/.cache/recall_dist/models/smollm2-135m-instruct").expanduser()
TINY_GQA = {
    "model_type": "llama",
    "vocab_size": 61,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def llama_lora_closed_form(config, r: int, targets: list[str]) -> int:
    """r x (fan_in + fan_out) per adapted projection, per decoder layer (GQA: k, v map H -> kv_heads x d);
    ``embed_tokens``: V -> H, ``lm_head``: H -> V."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    fans = {
        "q_proj": h + q,
        "k_proj": h + kv,
        "v_proj": h + kv,
        "o_proj": q + h,
        "gate_proj": h + inter,
        "up_proj": h + inter,
        "down_proj": inter + h,
    }
    per_layer = sum(r * fans[t] for t in targets if t in fans)
    once = sum(r * (config.vocab_size + h) for t in targets if t in ("embed_tokens", "lm_head"))
    return layers * per_layer + once


def peft_trainable(model: torch.nn.Module, r: int, target_modules) -> int:
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, bias="none")
    trainable, _ = peft.get_peft_model(model, config).get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize(
    "r,target_modules,closed_form_targets",
    [
        (8, ["q_proj", "v_proj"], ["q_proj", "v_proj"]),  # peft's default for Llama
        (16, LLAMA_LINEAR, LLAMA_LINEAR),
        (4, "all-linear", LLAMA_LINEAR),  # every Linear but the (tied) head
        (8, ["gate_proj", "up_proj"], ["gate_proj", "up_proj"]),
        (2, ["embed_tokens", "o_proj"], ["embed_tokens", "o_proj"]),
    ],
)
def test_adapter_count_is_the_closed_form_and_peft_s_on_a_tiny_gqa_llama(r, target_modules, closed_form_targets):
    torch.manual_seed(0)
    model = build_model(ModelConfig(config=TINY_GQA, tokenizer="char:product"))
    targets = lora_targets(model, target_modules)
    ours = lora_parameter_count(targets, r)
    assert ours == llama_lora_closed_form(model.config, r, closed_form_targets)
    assert ours == peft_trainable(model, r, target_modules)


def test_adapter_count_of_an_untied_head():
    """A head listed in target_modules (tiny Llama, untied): r x (H + V) more, which peft counts too."""
    model = build_model(load_train_config("configs/tiny_cpu.yaml").model)
    targets = lora_targets(model, ["q_proj", "lm_head"])
    assert [name for name, *_ in targets][-1] == "lm_head"
    assert lora_parameter_count(targets, 4) == llama_lora_closed_form(model.config, 4, ["q_proj", "lm_head"])
    assert lora_parameter_count(targets, 4) == peft_trainable(model, 4, ["q_proj", "lm_head"])


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="the converted SmolLM2 (recall-dist convert-gguf) is absent")
@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], "all-linear"])
def test_adapter_count_on_the_converted_smollm2(target_modules):
    """SmolLM2-135M on the meta device (GQA 9/3 heads, tied embeddings): all-linear r = 16 is 4,884,480."""
    model = build_model(ModelConfig(name_or_path=str(SMOLLM2)), meta=True)
    ours = lora_parameter_count(lora_targets(model, target_modules), 16)
    assert ours == peft_trainable(model, 16, target_modules)
    if target_modules == "all-linear":
        assert ours == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) == 4_884_480


def test_llama2_7b_q_v_r8_is_peft_s_published_count():
    """peft's README: LoRA r = 8 on q_proj, v_proj of Llama-2-7B trains 4,194,304 parameters."""
    model = build_model(load_train_config("configs/cdiv.yaml", ["model=llama2-7b"]).model, meta=True)
    assert lora_parameter_count(lora_targets(model, ["q_proj", "v_proj"]), 8) == 4_194_304


LORA_ALL = "model.lora={r: 16, target_modules: all-linear}"


def _plans(*overrides, world=8):
    full = load_train_config("configs/cdiv.yaml", ["model=llama2-7b", "model.dtype=bfloat16", *overrides])
    lora = load_train_config("configs/cdiv.yaml", ["model=llama2-7b", "model.dtype=bfloat16", *overrides, LORA_ALL])
    return plan_cli.make_plan(full, 1, world), plan_cli.make_plan(lora, 1, world)


def test_fsdp2_lora_rows_per_rank():
    """FSDP2, bf16, 8 ranks: the frozen base in bf16 (2 bytes) and the adapters' fp32 shard, gradient
    and Adam m, v (4 + 4 + 8 bytes), each over 8; the head's fp32 dW [V, H] (+ its bf16 copy) is gone."""
    full, lora = _plans("backend.name=fsdp2", "backend.bf16=true")
    base, n = full.total_params, lora.trainable_params
    assert lora.frozen_params == base and n == 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    rows = lora.rows
    assert rows["frozen base (sharded bfloat16)"] == pytest.approx(2 * base / 8)
    assert rows["adapters (sharded fp32)"] == pytest.approx(4 * n / 8)
    assert rows["adapter gradients (sharded fp32)"] == pytest.approx(4 * n / 8)
    assert rows["adapter optimizer states (Adam m, v)"] == pytest.approx(8 * n / 8)
    assert rows["parameters (2 unsharded units)"] == full.rows["parameters (2 unsharded units)"]
    head = full.rows["loss head (logits chunk + fp32 dW, dH)"] - rows["loss head (logits chunk + fp32 dH)"]
    assert head == 32000 * 4096 * (4 + 2)
    assert full.rows["optimizer states (Adam m, v)"] / rows["adapter optimizer states (Adam m, v)"] == pytest.approx(
        base / n
    )
    assert lora.total_bytes < full.total_bytes / 2


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_rows_per_rank(stage):
    """ZeRO-2 keeps every (frozen) parameter on each rank, ZeRO-3 partitions them; either way the bf16
    gradients and the fp32 master + Adam m, v (12 bytes) are the adapters' alone, partitioned."""
    full, lora = _plans("backend.name=deepspeed", f"backend.zero_stage={stage}", "backend.bf16=true")
    base, n = full.total_params, lora.trainable_params
    shards = 8 if stage == 3 else 1
    rows = lora.rows
    assert rows["frozen base"] == pytest.approx(2 * base / shards)
    assert rows["adapters"] == pytest.approx(2 * n / shards)
    assert rows["adapter gradients"] == pytest.approx(2 * n / 8)
    assert rows["adapter optimizer states (master + Adam m, v)"] == pytest.approx(12 * n / 8)
    assert lora.deepspeed_estimate_gib is None  # DeepSpeed's estimator assumes every parameter trains


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_with_dropout_adds_the_dropped_inputs(checkpointing):
    """Dropout > 0: each target keeps a dropped copy of its input (bf16) and a 1-byte mask besides the
    r-wide output of A; without dropout only the r-wide output.  Under gradient checkpointing only the
    layer being recomputed holds them (1 of 32)."""
    cfg = ["backend.name=fsdp2", "backend.bf16=true", "train.micro_batch_size=1", "data.max_length=1024"]
    cfg.append(f"train.gradient_checkpointing={str(checkpointing).lower()}")
    plans = [
        plan_cli.make_plan(
            load_train_config(
                "configs/cdiv.yaml",
                ["model=llama2-7b", *cfg, f"model.lora={{r: 16, target_modules: [q_proj, v_proj], dropout: {p}}}"],
            ),
            1,
            8,
        )
        for p in (0.0, 0.05)
    ]
    tokens, targets = 1024, (2 if checkpointing else 32 * 2)
    assert plans[0].rows["adapter activations"] == pytest.approx(tokens * targets * 16 * 2)
    assert plans[1].rows["adapter activations"] == pytest.approx(tokens * targets * (16 * 2 + 4096 * 3))


def test_plan_cli_prints_trainable_and_frozen(capsys):
    argv = ["configs/cdiv.yaml", "model=llama2-7b", "backend.name=fsdp2", LORA_ALL, "--gpus-per-node", "1"]
    assert plan_cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frozen_params"] == out["total_params"] - out["trainable_params"]
    assert out["total_gib"] == pytest.approx(sum(out["rows_gib"].values()))
    assert out["fits"] is True  # a 7B LoRA fine-tune on one 80 GiB GPU
    assert plan_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "LoRA r=16 on all-linear: 39.98M trainable adapter parameters" in text
    assert "adapter optimizer states (Adam m, v)" in text


def test_plan_without_lora_is_unchanged():
    cfg = load_train_config("configs/cdiv.yaml")
    plan = plan_cli.make_plan(cfg, 1, 8)
    assert plan.trainable_params == plan.total_params and plan.frozen_params == 0
    assert plan.total_params == count_parameters(build_model(cfg.model, meta=True))
