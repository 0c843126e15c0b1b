"""The weight sources read exactly what they should: safetensors row ranges equal safetensors' own
loader, the seeded initialisation is a pure function of (seed, module name), tied parameters have one owner."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from recall_dist.train.weights import RandomInit, SafetensorsFile, module_seed, owned_parameters
from tests.train.helpers import build, tiny_config_dict


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_row_reads_equal_the_safetensors_loader(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "matrix": (torch.randn(11, 6, generator=g) * 100).to(dtype),
        "vector": (torch.randn(9, generator=g) * 100).to(dtype),
        "scalar": torch.tensor(3, dtype=dtype),
        "cube": (torch.randn(4, 3, 2, generator=g) * 100).to(dtype),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference, reader = load_file(str(path)), SafetensorsFile(path)
    for name, full in reference.items():
        if full.dim() == 0:
            assert torch.equal(reader.read_rows(name, 0, 0), full)
            continue
        n = full.shape[0]
        for start, stop in ((0, n), (1, 4), (n - 1, n), (3, 3), (2, n + 5)):
            assert torch.equal(reader.read_rows(name, start, stop), full[start:stop]), (name, start, stop)


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(OSError, match="truncated file"):
        SafetensorsFile(path).read_rows("a", 0, 64)


def test_seeded_init_is_a_function_of_seed_and_module_name():
    from recall_dist.train.models import build_model

    model = build_model(build(tiny_config_dict("unused")).model, meta=True)
    init = RandomInit(model, seed=3)
    proj = dict(model.named_modules())["model.layers.1.mlp.up_proj"]
    first = init.readers("model.layers.1.mlp.up_proj", proj, ["weight"])["weight"](0, 64)
    # another order of visits, another instance: the same values
    init.readers("model.embed_tokens", model.model.embed_tokens, ["weight"])
    again = RandomInit(model, seed=3).readers("model.layers.1.mlp.up_proj", proj, ["weight"])["weight"](0, 64)
    assert torch.equal(first, again)
    other = RandomInit(model, seed=3).readers("model.layers.0.mlp.up_proj", proj, ["weight"])["weight"](0, 64)
    assert not torch.equal(first, other)  # the module name is part of the seed
    assert module_seed(3, "a") != module_seed(4, "a") and 0 <= module_seed(3, "a") < 2**63


def test_tied_parameters_have_one_owner():
    from recall_dist.train.models import build_model

    cfg = build(tiny_config_dict("unused"))
    model = build_model(cfg.model, meta=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    owners = [(m, [n for n, _ in own]) for m, _, own in owned_parameters(model)]
    assert ("model.embed_tokens", ["weight"]) in owners and all(m != "lm_head" for m, _ in owners)


# A tiny Gemma 3: its embedding owns a parameter *and* a non-persistent buffer (embed_scale = sqrt(hidden)),
# which to_empty leaves uninitialised; its rotary modules own per-layer-type buffers and no parameters.
GEMMA3 = {
    "model_type": "gemma3_text",
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 64,
    "sliding_window": 8,
}


@pytest.mark.parametrize("source", ["pretrained", "init"])
def test_buffers_of_modules_with_parameters_are_initialised(tmp_path, source):
    """A model built on meta and materialised (the path of every backend) has the buffers and the logits of
    the same model built by Hugging Face: loaded from a checkpoint (``from_pretrained``), or initialised from
    a config (``embed_scale`` is sqrt(hidden) for a model the seeded initialisation builds too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from recall_dist.train.models import build_model

    params = dict(GEMMA3)
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config).eval()
    if source == "pretrained":
        reference.save_pretrained(tmp_path / "gemma")
        model_section = {"name_or_path": str(tmp_path / "gemma"), "attn_implementation": "eager"}
    else:
        model_section = {"config": GEMMA3, "tokenizer": "char:product", "attn_implementation": "eager"}
    model = build_model(build(tiny_config_dict("unused", model=model_section)).model, seed=1).eval()

    buffers = dict(model.named_buffers())
    assert buffers["model.embed_tokens.embed_scale"].item() == pytest.approx(GEMMA3["hidden_size"] ** 0.5)
    for name, expected in reference.named_buffers():
        torch.testing.assert_close(buffers[name], expected, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, GEMMA3["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        if source == "pretrained":
            torch.testing.assert_close(logits, reference(input_ids=ids).logits)
    assert logits.std() > 0.01  # not the uniform distribution an all-zero embedding gives
