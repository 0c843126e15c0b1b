"""One tokenization path for training and evaluation, with a real Hugging Face BPE tokenizer whose
post-processor adds bos (built here with the ``tokenizers`` library, nothing downloaded): the ids
the sweep scores and generates from are the ids ``tokenize_example`` gives training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from recall_dist.configtree import from_dict
from recall_dist.constants import IGNORE_INDEX
from recall_dist.data import build_task, load_tokenizer, tokenize_example
from recall_dist.eval import SweepConfig, compute_shard, known_support, text
from recall_dist.eval.tokens import pad_batch, prompt_ids

TASK = build_task("product_conditional", max_factor=4)


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the task's strings; its post-processor prepends <s> to every encode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [r["prompt"] + r["completion"] for r in TASK.sample(400, seed=0)]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = _bpe_tokenizer()
    assert tokenizer.encode("12*")[0] == tokenizer.bos_token_id  # the post-processor really adds bos
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("bpe_model")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def recorded_inputs(monkeypatch) -> list:
    """Every (input_ids, attention_mask) a Llama forward receives (the real forward still runs)."""
    calls, forward = [], LlamaForCausalLM.forward

    def recording_forward(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", recording_forward)
    return calls


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def test_scored_ids_are_the_training_ids(model_dir, tmp_path, recorded_inputs):
    tokenizer = load_tokenizer(str(model_dir))  # reloaded from disk, as the sweep does
    cfg = from_dict(
        SweepConfig,
        {
            "models": [{"name": "bpe", "path": str(model_dir)}],
            "task": "product_conditional",
            "task_params": {"max_factor": 4},
            "temperatures": [1.0],
            "num_samples": 0,
            "recall_at_n": 5,
            "score_batch_size": 3,
            "output_dir": str(tmp_path),
        },
    )
    compute_shard(cfg, 0, 1, progress=False)
    seen = sorted(row for ids, mask in recorded_inputs for row in _rows(ids, mask))
    training = sorted(
        tokenize_example(p, c, tokenizer)["input_ids"] for p in TASK.prompts() for c in TASK.target_distribution(p)
    )
    assert seen == training
    assert all(row.count(tokenizer.bos_token_id) == 1 for row in seen)  # never [bos, bos, ...]


def test_log_q_is_minus_the_training_loss(model_dir):
    """At T = 1, log Q(x | prompt) of every support element is minus the summed cross-entropy that
    training computes on ``tokenize_example``'s ids and labels (one unpadded sequence at a time)."""
    tokenizer = load_tokenizer(str(model_dir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = "3*"
    encoded = known_support.encode_prompt(tokenizer, prompt, TASK.target_distribution(prompt))
    got = known_support.support_log_probs(model, encoded, [1.0], batch_size=3, pad_id=tokenizer.pad_token_id)[0]
    expected = []
    for completion in encoded.texts:
        ex = tokenize_example(prompt, completion, tokenizer)
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        expected.append(-loss.item())
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_generation_starts_from_the_training_prompt(model_dir, recorded_inputs):
    tokenizer = load_tokenizer(str(model_dir))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = ["1*", "4*"]
    text.generate_texts(model, tokenizer, prompts, temperatures=[1.0], seeds=[[0, 1]], max_new_tokens=3)
    first_ids, first_mask = recorded_inputs[0]  # the prefill of the distinct prompts
    # Training's example of (prompt, ""): the prompt head, then the eos that ends the empty completion.
    heads = [tokenize_example(p, "", tokenizer)["input_ids"][:-1] for p in prompts]
    assert heads == [prompt_ids(tokenizer, p) for p in prompts]
    assert _rows(first_ids, first_mask) == heads
    assert all(h.count(tokenizer.bos_token_id) == 1 for h in heads)


def test_pad_batch_alignment():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
