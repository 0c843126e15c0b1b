"""Hugging Face ``Trainer`` / TRL ``SFTTrainer`` with peft LoRA adapters and the recall loss, with the real
peft 0.21 / TRL 1.16 / transformers 5 on a tiny Llama (the loss does the lm_head matmul itself, so it must
reach the head through the peft wrapper):

- one c-Div step's adapter gradients and logged loss equal those of a one-process ``PeftModel`` whose full
  logits go through a plain weighted NLL (relative 1e-5): ``RecallSFTTrainer(..., peft_config=...)`` with
  LoRA on the attention (also 2 x 4 accumulated), a tied embedding (also with LoRA on ``embed_tokens``, or
  with trainable token rows), ``modules_to_save=["lm_head"]``; ``RecallTrainer`` given a ``PeftModel``
  with LoRA on ``lm_head`` itself (tied and untied); ZeRO-3 on 2 gloo ranks (slow): both of those paths,
  every parameter partitioned;
- the base weights stay bit-identical and only the trainable parameters get optimizer state;
- a LoRA ``lm_head`` with dropout gives the loss and gradients of peft's own ``lm_head`` forward (same mask);
- refused, naming ``lm_head`` in ``target_modules``: LoRA on ``lm_head`` through TRL (TRL 1.16's own check)
  and DoRA on ``lm_head`` (ours).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import peft
import pytest
import torch
import trl
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, TrainerCallback

from recall_dist import build_loss
from recall_dist.constants import IGNORE_INDEX
from recall_dist.integrations.hf import RecallTrainer, attach_loss_head, recall_compute_loss
from tests.integrations.hf_setup import char_tokenizer, product_texts, reference_loss, text_dataset, tiny_llama
from tests.integrations.test_hf import RecallSFTTrainer, sft_config

ALPHA = 1.4
ATTENTION = ["q_proj", "v_proj"]
ACCUMULATE = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
CASES = {  # name: (trainer, tied embeddings, LoraConfig keywords, training arguments)
    "sft-attention": ("sft", False, {"target_modules": ATTENTION}, {}),
    "sft-attention-2x4": ("sft", False, {"target_modules": ATTENTION}, ACCUMULATE),
    "sft-tied": ("sft", True, {"target_modules": ATTENTION}, {}),
    # LoRA on the (tied) input embedding: lm_head stays the plain tied weight, in peft's forward and ours
    "sft-tied-lora_embed_tokens": ("sft", True, {"target_modules": ["embed_tokens", *ATTENTION]}, {}),
    # trainable token rows on a tied embedding: peft wraps lm_head too (TrainableTokensWrapper, shared rows)
    "sft-tied-trainable_tokens": (
        "sft",
        True,
        {"target_modules": ATTENTION, "trainable_token_indices": {"embed_tokens": [3, 4, 5]}},
        {},
    ),
    "sft-modules_to_save": ("sft", False, {"target_modules": ATTENTION, "modules_to_save": ["lm_head"]}, {}),
    "trainer-lora_lm_head": ("trainer", False, {"target_modules": [*ATTENTION, "lm_head"]}, {}),
    "trainer-tied-lora_lm_head": ("trainer", True, {"target_modules": [*ATTENTION, "lm_head"]}, ACCUMULATE),
}


class RecordingRecallTrainer(RecallTrainer):
    """``RecallTrainer`` plus a record of the first optimizer step's micro-batches (as ``RecallSFTTrainer``)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._objective is not None and self.state.global_step == 0:
            self.first_step_batches.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def collate(examples: list[dict]) -> dict:
    """Right-padded rows of token ids, -100 labels on the padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def tokenized_dataset(n: int = 64) -> Dataset:
    tokenizer = char_tokenizer()
    return Dataset.from_dict({"input_ids": [[1, *tokenizer(t)["input_ids"], 2] for t in product_texts(n)]})


class FirstStepGrads(TrainerCallback):
    """The trainable parameters' gradients at the first optimizer step (after accumulation, before the update)."""

    grads: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_model(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    if not tied:
        return tiny_llama(seed)
    config = tiny_llama(seed).config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def lora_config(**overrides) -> LoraConfig:
    # init_lora_weights=False: B is random too, so A has a gradient at the first step (B = 0 would zero it)
    values = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False, "task_type": "CAUSAL_LM"}
    return LoraConfig(**(values | overrides))


def max_relative(got: dict, expected: dict) -> float:
    assert all(float(e.abs().max()) > 0 for e in expected.values())  # a zero reference would prove nothing
    return max(float((got[n] - e).abs().max() / e.abs().max()) for n, e in expected.items())


def one_step_trainer(tmp, kind: str, tied: bool, lora: dict, overrides: dict, callback=None):
    """``RecallSFTTrainer(..., peft_config=...)`` on raw text (TRL packs it), or ``RecallTrainer`` given a
    ``PeftModel`` and right-padded batches; c-Div, one Adam step of 8 rows (or 2 x 4), no clipping."""
    common = {
        "recall_loss": "cdiv",
        "recall_loss_params": {"alpha": ALPHA},
        "callbacks": [callback] if callback else [],
    }
    args = sft_config(tmp, **({"max_steps": 1, "optim": "adamw_torch", "learning_rate": 1e-2} | overrides))
    if kind == "sft":
        data, tokenizer = text_dataset(64), char_tokenizer()
        return RecallSFTTrainer(
            model=tiny_model(tied),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(**lora),
            **common,
        )
    args.remove_unused_columns = False
    model = get_peft_model(tiny_model(tied), lora_config(**lora))
    return RecordingRecallTrainer(
        model=model, args=args, train_dataset=tokenized_dataset(), data_collator=collate, **common
    )


@pytest.mark.parametrize("case", CASES)
def test_one_step_with_lora_matches_a_peft_reference(tmp_path, case):
    kind, tied, lora, overrides = CASES[case]
    grads = FirstStepGrads()
    trainer = one_step_trainer(tmp_path, kind, tied, lora, overrides, grads)
    trainer.first_step_batches = []
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_trainable = ("lora_A", "lora_B", "lora_embedding_", "trainable_tokens_delta") + (
        ("modules_to_save",) if "modules_to_save" in lora else ()
    )
    assert trainable and all(any(k in n for k in expected_trainable) for n in trainable), trainable
    if "lm_head" in lora["target_modules"]:
        assert any("lm_head.lora_B" in n for n in trainable)
    trainer.train()

    assert len(trainer.first_step_batches) == trainer.args.gradient_accumulation_steps
    # the reference: a fresh one-process PeftModel with the same weights, full logits, plain weighted NLL
    reference = get_peft_model(tiny_model(tied), lora_config(**lora))
    assert set(dict(reference.named_parameters())) == set(before)
    with torch.no_grad():  # by parameter, not state dict: a tied head is one parameter, two state-dict keys
        for name, p in reference.named_parameters():
            p.copy_(before[name])
    loss = reference_loss(reference, trainer.first_step_batches, ALPHA)
    loss.backward()
    loss = float(loss)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert set(expected) == trainable
    got = {n: grads.grads[n] for n in trainable}
    assert max_relative(got, expected) < 1e-5
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss, rel=1e-6)

    # the base is bit-identical, the adapters moved, and only they have optimizer state
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name
            assert after[name].grad is None, name
    assert not any("recall_loss_head" in key for key in model.state_dict())  # the head owns no parameter
    with_state = {id(p) for p, state in trainer.optimizer.state.items() if state}
    assert with_state == {id(after[n]) for n in trainable}
    print(
        f"\n[peft:{case}] {len(trainable)} adapter tensors; max relative |grad - reference| "
        f"{max_relative(got, expected):.2e}; loss {trainer.state.log_history[0]['loss']:.6f} vs {loss:.6f}"
    )


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """c-Div from full logits: w = exp((alpha - 1) l), detached; sum w l / sum w over the shifted targets."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, labels[:, 1:, None]).squeeze(-1).flatten()
    w = torch.exp((alpha - 1.0) * nll.detach())
    return (w * nll).sum() / w.sum()


def test_a_lora_lm_head_with_dropout_is_exact():
    """``[x, s A drop(x)] @ [W, B]^T`` draws the dropout mask as peft's ``lm_head`` forward does: with
    the same seed, the same loss and gradients (A, B and the hidden states)."""
    model = get_peft_model(tiny_llama(0), lora_config(target_modules=["lm_head"], lora_dropout=0.3))
    model.train()
    head = attach_loss_head(model)
    head.loss, head.dp_group = build_loss("cdiv", alpha=ALPHA), None
    lm_head = model.get_output_embeddings()
    adapter = [lm_head.lora_A["default"].weight, lm_head.lora_B["default"].weight]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 32, generator=g, requires_grad=True)
    labels = torch.randint(3, 15, (3, 9), generator=g)

    def run(loss_of, seed=7):
        torch.manual_seed(seed)
        loss = loss_of()
        grads = torch.autograd.grad(loss, [hidden, *adapter])
        return loss.detach(), grads

    ours, our_grads = run(lambda: head(hidden, labels)[0])
    theirs, their_grads = run(lambda: weighted_nll(lm_head(hidden), labels, ALPHA))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    other_mask, _ = run(lambda: head(hidden, labels)[0], seed=8)
    assert abs(float(other_mask - ours)) > 1e-4  # the dropout is really on


def test_a_head_attached_before_peft_wrapped_the_model_sees_the_adapter():
    """``recall_compute_loss`` on the bare model first, then ``get_peft_model`` (which replaces ``lm_head`` in
    place): the head is looked up at every call, so the LoRA on ``lm_head`` is in the loss."""
    model = tiny_model(True)
    ids = torch.randint(3, 15, (4, 11), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.masked_fill(ids == 5, -100)}
    loss = build_loss("cdiv", alpha=ALPHA)
    recall_compute_loss(model, batch, loss, dp_group=None)
    model = get_peft_model(model, lora_config(target_modules=[*ATTENTION, "lm_head"]))
    recall_compute_loss(model, batch, loss, dp_group=None).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.lora" in n for n in got)
    assert not any("recall_loss_head" in key for key in model.state_dict())  # the head owns no parameter
    model.zero_grad()
    reference_loss(model, [batch], ALPHA).backward()
    assert max_relative(got, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}) < 1e-5


def test_lora_on_lm_head_through_trl_is_refused_by_trl(tmp_path):
    """TRL 1.16's ``SFTTrainer`` refuses an adapter on ``lm_head`` itself, before our mixin runs; with
    ``RecallTrainer`` it works (above)."""
    with pytest.raises(ValueError, match=re.escape("Remove `'lm_head'` from your `target_modules`")):
        RecallSFTTrainer(
            model=tiny_llama(0),
            args=sft_config(tmp_path, max_steps=1),
            train_dataset=text_dataset(8),
            processing_class=char_tokenizer(),
            recall_loss="cdiv",
            peft_config=lora_config(target_modules=["q_proj", "lm_head"]),
        )


def test_dora_on_lm_head_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(0), lora_config(target_modules=["q_proj", "lm_head"], use_dora=True))
    with pytest.raises(ValueError, match=re.escape("remove 'lm_head' from the peft config's target_modules")):
        RecallTrainer(
            model=model,
            args=sft_config(tmp_path, max_steps=1),
            train_dataset=tokenized_dataset(8),
            data_collator=collate,
            recall_loss="cdiv",
        )


def test_readme_peft_recipe_runs_and_saves_a_loadable_adapter(tmp_path, monkeypatch):
    """The README's TRL recipe, then its ``peft_config`` block, run as written (CPU: ``use_cpu``, fp32, 2
    steps); the saved adapter directory loads with ``PeftModel.from_pretrained`` and gives the trainer's logits."""
    cpu_config = functools.partial(trl.SFTConfig, use_cpu=True, bf16=False, max_steps=2, report_to=[])
    monkeypatch.setattr(trl, "SFTConfig", cpu_config)
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[2] / "README.md").read_text(), re.S)
    recipe = next(b for b in blocks if "RecallTrainerMixin, SFTTrainer" in b)
    lora_recipe = next(b for b in blocks if "peft_config=" in b)
    ns = {
        "output_dir": str(tmp_path),
        "model": tiny_llama(0),
        "dataset": text_dataset(64),
        "tokenizer": char_tokenizer(),
    }
    exec(compile(recipe, "README.md", "exec"), ns)
    ns["model"] = tiny_llama(0)
    exec(compile(lora_recipe, "README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert isinstance(trainer.model, peft.PeftModel) and trainer.state.global_step == 2
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path)).eval()
    ids = torch.randint(3, 15, (2, 9), generator=torch.Generator().manual_seed(0))
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(tiny_llama(0)(input_ids=ids).logits, trained(input_ids=ids).logits)


def _zero3_lora_step(tmp: str, case: str) -> None:
    """One ZeRO-3 SGD step of ``CASES[case]`` on every rank's 4 rows, every parameter partitioned: the
    update equals the full-logits reference on the global batch of 8, the base stays bit-identical.  With
    LoRA on ``lm_head``, its base weight and ``lora_B`` are read by the loss outside their modules'
    forwards, so they must be gathered for it (external parameters of ``recall_loss_head``)."""
    import deepspeed
    import torch.distributed as dist

    from tests.integrations.test_hf import ZERO3

    kind, tied, lora, _ = CASES[case]
    overrides = {"per_device_train_batch_size": 4, "deepspeed": ZERO3, "optim": "sgd", "learning_rate": 0.05}
    trainer = one_step_trainer(tmp, kind, tied, lora, overrides)
    trainer.first_step_batches = []
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    head = trainer.model.get_output_embeddings()
    head = head.lora_B["default"] if "lm_head" in lora["target_modules"] else head
    assert head.weight.ds_numel > 0 and head.weight.numel() == 0  # partitioned outside a forward
    batches = [None] * dist.get_world_size()
    dist.all_gather_object(batches, trainer.first_step_batches)
    reference = get_peft_model(tiny_model(tied), lora_config(**lora))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(before[name])
    loss = reference_loss(reference, [b for rank in batches for b in rank], ALPHA)
    loss.backward()
    expected = dict(reference.named_parameters())
    steps = []
    for name, p in trainer.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if name in trainable:
                step = 0.05 * expected[name].grad
                torch.testing.assert_close(p.detach(), expected[name].detach() - step, rtol=0, atol=1e-7, msg=name)
                steps.append(float(step.abs().max()))
            else:
                assert torch.equal(p.detach(), before[name]), name
    assert len(steps) == len(trainable) and min(steps) > 1e-5  # every step is far above the tolerance
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["trainer-lora_lm_head", "sft-tied"])
def test_zero3_lora_two_ranks(tmp_path, monkeypatch, case):
    from recall_dist.distributed.testing import run_distributed_test

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_distributed_test(_zero3_lora_step, 2, str(tmp_path), case)
