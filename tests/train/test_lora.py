"""recall_dist/train/lora.py and ``model.lora`` in one process: the config section's defaults and errors
(each naming its key), QLoRA's CUDA path (GPU only; QLoRA on CPU is tested in test_qlora.py), peft's layers
injected with the base frozen (counts equal to ``peft.get_peft_model``'s own), the seeded adapter
initialisation (the adapted model starts equal to the base), the fingerprint (a LoRA run and a full run are
different experiments), the loss head with ``lm_head`` adapted against full logits of a peft model, and the
adapter / merged writers read back by peft and transformers.  The distributed runs are in
test_lora_distributed.py."""

from __future__ import annotations

import pytest
import torch

from recall_dist.configtree import ConfigError, to_dict
from recall_dist.train.config import LORA_DEFAULT_TARGETS, MODEL_PRESET_DIR, load_train_config
from tests.train.helpers import build, reference_loss, tiny_config_dict

TINY_LLAMA = str(MODEL_PRESET_DIR / "tiny-llama.yaml")


def _cfg(lora: dict | None = None, **model_config):
    from recall_dist.configtree import load_yaml

    model = load_yaml(TINY_LLAMA)
    model["config"].update(model_config)
    if lora is not None:
        model["lora"] = lora
    return build(tiny_config_dict("unused", model=model))


# ---------------------------------------------------------------- config


def test_defaults_are_what_a_peft_user_expects():
    cfg = load_train_config(None, ["model=tiny-llama", "model.lora={}", "backend.name=fsdp2"])
    lora = cfg.model.lora
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32.0, 0.05)
    assert lora.target_modules == list(LORA_DEFAULT_TARGETS)
    assert (lora.merge_on_export, lora.quantize) == (False, None)
    assert load_train_config(None, ["model=tiny-llama", "backend.name=fsdp2"]).model.lora is None  # opt-in
    assert load_train_config(None, ["model=tiny-llama", "model.lora.target_modules=all-linear"]).model.lora


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.lora.r=0", "model.lora.r"),
        ("model.lora.alpha=-1", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
        ("model.lora.target_modules=q_proj", "model.lora.target_modules"),  # a string: only all-linear
        ("model.lora.target_modules=[q_proj, q_proj]", "model.lora.target_modules"),
        ("model.lora.target_modules=[model.q_proj]", "model.lora.target_modules"),
        ("model.lora.quantize=8bit", "model.lora.quantize"),
        ("model.lora.merge_on_export=maybe", "model.lora.merge_on_export"),
        ("model.lora.rank=8", "model.lora"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_train_config(None, ["model=tiny-llama", override])
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"{key}: ")


def test_unknown_target_module_names_the_key_and_the_linear_layers():
    from recall_dist.train.models import build_model

    cfg = _cfg({"target_modules": ["qkv_proj"]})
    with pytest.raises(ConfigError) as info:
        build_model(cfg.model, meta=True)
    assert info.value.key == "model.lora.target_modules"
    assert "q_proj" in str(info.value)  # lists what the model has


def test_an_adapted_head_tied_to_the_embedding_is_refused():
    from recall_dist.train.models import build_model

    cfg = _cfg({"target_modules": ["q_proj", "lm_head"]}, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tie_word_embeddings") as info:
        build_model(cfg.model, meta=True)
    assert info.value.key == "model.lora.target_modules"


@pytest.mark.gpu
def test_qlora_trains_on_cuda():
    """The CUDA path of ``quantize: 4bit``: the run is accepted (no refusal, no CPU warning), ``build_model``
    puts the decoder's linear layers in 4 bits on the GPU under peft's 4-bit LoRA layers, and a few Adam steps
    on the adapters lower the loss while the 4-bit bytes stay bit-identical.  The CPU runs of the same path
    (one process and 2 ranks, against peft's own QLoRA) are in test_qlora.py."""
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from recall_dist.train.lora import trainable_parameters
    from recall_dist.train.models import build_model
    from recall_dist.train.qlora import four_bit_layers, four_bit_state
    from recall_dist.train.resources import validate_resources

    cfg = _cfg({"r": 4, "quantize": "4bit"})
    validate_resources(cfg)  # accepted where CUDA and bitsandbytes are
    model = build_model(cfg.model, seed=0, device="cuda").train()
    layers = four_bit_layers(model)
    assert len(layers) == 2 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    assert all(m.weight.device.type == "cuda" and m.weight.bnb_quantized for m in layers.values())
    before = four_bit_state(model)
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    batch = {"input_ids": torch.randint(3, 13, (4, 12), device="cuda")}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"]
    losses = []
    for _ in range(5):
        loss = reference_loss(model, batch, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = four_bit_state(model)
    assert all(torch.equal(after[k], t) for k, t in before.items())


# ---------------------------------------------------------------- the model


def test_base_frozen_adapters_trainable_fp32_counts_equal_peft():
    import peft
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import is_adapter_parameter, parameter_split, trainable_parameter_names
    from recall_dist.train.models import build_model

    cfg = _cfg({"r": 4})
    model = build_model(cfg.model, meta=True, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.requires_grad == is_adapter_parameter(name), name
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    names = trainable_parameter_names(model)
    assert len(names) == 2 * 7 * 2  # A and B, 7 projections, 2 layers

    hf = AutoModelForCausalLM.from_config(cfg.model.hf_config())
    reference = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=32, target_modules=list(LORA_DEFAULT_TARGETS)))
    trainable, total = reference.get_nb_trainable_parameters()
    assert parameter_split(model) == (trainable, total - trainable)


def test_the_adapted_model_starts_equal_to_the_base_and_the_init_is_seeded():
    from recall_dist.train.lora import base_parameter_name, is_adapter_parameter
    from recall_dist.train.models import build_model

    cfg, full = _cfg({"r": 4}), _cfg()
    model, base = build_model(cfg.model, seed=3), build_model(full.model, seed=3)
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        if not is_adapter_parameter(name):
            assert torch.equal(p, base_params[base_parameter_name(name)]), name
        elif ".lora_B." in name:
            assert torch.count_nonzero(p) == 0, name
        else:  # Kaiming-uniform(a = sqrt(5)) on [r, in]: bound 1 / sqrt(in)
            bound = 1 / p.shape[1] ** 0.5
            assert p.abs().max() <= bound and p.std() > bound / 3, name
    ids = torch.randint(0, 13, (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    again = dict(build_model(cfg.model, seed=3).named_parameters())
    other = dict(build_model(cfg.model, seed=4).named_parameters())
    name = "model.layers.1.mlp.up_proj.lora_A.default.weight"
    assert torch.equal(again[name], dict(model.named_parameters())[name])
    assert not torch.equal(other[name], again[name])


def test_lora_and_full_runs_are_different_experiments():
    from recall_dist.train.rundir.experiment import config_fingerprint, fingerprint_differences

    full, lora = config_fingerprint(to_dict(_cfg())), config_fingerprint(to_dict(_cfg({"r": 8})))
    assert full["sha256"] != lora["sha256"]
    assert any(line.startswith("model.lora.r: '(not set)' -> 8") for line in fingerprint_differences(full, lora))
    other_rank = config_fingerprint(to_dict(_cfg({"r": 4})))
    assert fingerprint_differences(lora, other_rank) == ["model.lora.r: 8 -> 4"]
    merged = config_fingerprint(to_dict(_cfg({"r": 8, "merge_on_export": True})))
    assert fingerprint_differences(lora, merged) == []  # what final/ holds, not what trains
    # A checkpoint written before model.lora existed continues as the full run it was.
    old = {"sha256": "x", "keys": {k: v for k, v in full["keys"].items() if k != "model.lora"}}
    assert fingerprint_differences(old, full) == []


# ---------------------------------------------------------------- the loss head, export


def _trained_looking(model, seed: int = 0):
    """Nonzero adapters (B too), as after some training."""
    from recall_dist.train.lora import is_adapter_parameter

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def _peft_twin(cfg, model):
    """``peft.get_peft_model`` over a plain Hugging Face model holding ``model``'s base, with its adapters."""
    import peft
    from transformers import AutoModelForCausalLM

    from recall_dist.train.lora import base_parameter_name, is_adapter_parameter

    lora = cfg.model.lora
    hf = AutoModelForCausalLM.from_config(cfg.model.hf_config())
    params = dict(model.named_parameters())
    hf.load_state_dict({base_parameter_name(n): p for n, p in params.items() if not is_adapter_parameter(n)})
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    twin = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.requires_grad:
                p.copy_(params[name.removeprefix("base_model.model.")])
    return twin


def test_adapted_head_loss_and_gradients_equal_peft_full_logits():
    """lm_head in target_modules: the fused loss head runs [W, B] [x; s A x]; a peft model's full logits give
    the same c-Div loss and adapter gradients."""
    from recall_dist.losses import build_loss
    from recall_dist.train.loss_head import CausalLMWithLossHead
    from recall_dist.train.models import build_model

    cfg = _cfg({"r": 4, "dropout": 0.0, "target_modules": ["v_proj", "lm_head"]})
    model = _trained_looking(build_model(cfg.model, seed=1))
    twin = _peft_twin(cfg, model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 13, (3, 10), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    wrapper = CausalLMWithLossHead(model, build_loss("cdiv", alpha=1.4))
    loss, _ = wrapper(**batch)
    loss.backward()
    expected = reference_loss(twin, batch, alpha=1.4)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm_head.lora_") for n in grads)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # float32 summation order: the error scales with the tensor's largest entries
            atol = 1e-5 * grads[name].abs().max().item()
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_adapter_directory_loads_with_peft_and_merge_equals_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.eval.config import ModelSpec
    from recall_dist.eval.loading import load_model
    from recall_dist.train.export import write_hf_directory
    from recall_dist.train.lora import merged_parameters, read_adapter_config, write_adapter
    from recall_dist.train.models import build_model

    cfg = _cfg({"r": 4, "alpha": 16.0, "target_modules": "all-linear"}, tie_word_embeddings=True)
    model = _trained_looking(build_model(cfg.model, seed=2), seed=1)
    model.eval()
    stream = [(n, p.detach()) for n, p in model.named_parameters()]
    base = build_model(_cfg(tie_word_embeddings=True).model, seed=2)
    base.save_pretrained(tmp_path / "base")
    write_adapter(
        model,
        iter(stream),
        cfg.model.lora,
        tmp_path / "adapter",
        base_model_name_or_path=str(tmp_path / "base"),
        tokenizer=load_tokenizer("char:product"),
    )
    saved = read_adapter_config(tmp_path / "adapter")
    assert (saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == (4, 16, str(tmp_path / "base"))
    assert sorted(saved["target_modules"]) == sorted(LORA_DEFAULT_TARGETS)  # all-linear, resolved: not lm_head

    ids = torch.randint(0, 13, (2, 11))
    with torch.no_grad():
        plain = base(input_ids=ids).logits  # (from_pretrained injects into base in place)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
        assert (want - plain).abs().max() > 1e-3  # the adapter matters

    write_hf_directory(
        model.config, merged_parameters(iter(stream), cfg.model.lora), None, tmp_path / "m", torch.float32
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    reference = loaded.merge_and_unload()  # peft's own merge
    state = merged.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        # What the temperature sweep loads for a LoRA run's final/: the named base with the adapter merged.
        swept, tokenizer = load_model(ModelSpec("lora", str(tmp_path / "adapter")), tmp_path / "cache", "0" * 64)
        assert type(swept) is type(base) and len(tokenizer) == 13  # a plain model, the saved tokenizer
        torch.testing.assert_close(swept(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
