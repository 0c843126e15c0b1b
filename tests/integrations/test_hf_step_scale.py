"""A skipped step through the Hugging Face integration (``integrations/hf.py`` with
``train/step_scale.py``), on a real ``transformers.Trainer``: every label of the step ignored (N = 0), two
micro-batches, AdamW with weight decay (which would move the weights on a zero gradient).  Plain and
under DeepSpeed ZeRO-2 (gloo, CPU): no update, no optimizer state, a finite logged loss of 0."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from recall_dist.distributed.testing import run_distributed_test
from recall_dist.integrations.hf import RecallTrainer
from tests.integrations.hf_setup import tiny_llama

ZERO2 = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": "auto",
}


def ignored_labels(examples: list[dict]) -> dict:
    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}


def skipped_step(tmp: str, deepspeed: dict | None) -> None:
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 15, (8, 12), generator=g).tolist()})
    args = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.05,
        weight_decay=0.1,
        optim="adamw_torch",
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        deepspeed=deepspeed,
        seed=0,
    )
    trainer = RecallTrainer(
        model=tiny_llama(0), args=args, train_dataset=data, data_collator=ignored_labels, recall_loss="cdiv"
    )
    trainer.train()
    assert trainer.last_recall_stats["tokens"] == 0.0 and trainer.last_recall_stats["loss"] == 0.0
    logged = trainer.state.log_history[0]["loss"]
    assert logged == 0.0 and math.isfinite(trainer.state.log_history[-1]["train_loss"]), trainer.state.log_history
    reference = dict(tiny_llama(0).named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), reference[name].detach()), f"a skipped step moved {name}"
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper (plain) or DeepSpeed's ZeRO optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)
    assert not [s for s in optimizer.state.values() if s], "the optimizer stepped on a skipped step"


def test_a_skipped_step_leaves_the_model(tmp_path):
    skipped_step(str(tmp_path), None)


@pytest.mark.slow
def test_a_skipped_step_leaves_the_model_under_zero2(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_distributed_test(skipped_step, 1, str(tmp_path), ZERO2)
