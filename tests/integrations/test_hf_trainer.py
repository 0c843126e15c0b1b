"""A real tiny ``transformers.Trainer`` run with ``RecallTrainer`` (c-Div): the loss equals the
full-logits reference on a batch, gradients match, and training lowers the NLL."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from recall_dist import build_loss
from recall_dist.data import load_tokenizer
from recall_dist.data.config import DataConfig
from recall_dist.data.dataset import build_dataset
from recall_dist.data.loader import DistributedBatchIterator
from recall_dist.integrations.hf import RecallTrainer, recall_compute_loss
from recall_dist.train.config import load_train_config
from recall_dist.train.models import build_model
from tests.train.helpers import reference_loss


class Collator:
    """Right-pads examples with the data module's own collate (labels aligned, -100 on padding)."""

    def __init__(self, dataset):
        self.iterator = DistributedBatchIterator(dataset, 1)

    def __call__(self, examples):
        batch = self.iterator.collate(examples)
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}


def _setup():
    cfg = load_train_config("configs/tiny_cpu.yaml")
    tokenizer = load_tokenizer("char:product")
    dataset = build_dataset(DataConfig(task_params={"max_factor": 9}, num_samples=640), tokenizer)
    torch.manual_seed(0)
    return build_model(cfg.model), tokenizer, dataset


def test_compute_loss_matches_full_logits_reference():
    model, _, dataset = _setup()
    batch = Collator(dataset)(dataset[:8])
    loss = recall_compute_loss(model, batch, build_loss("cdiv", alpha=1.4))
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_loss(model, batch, alpha=1.4)
    expected.backward()
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_tiny_trainer_run_lowers_the_loss(tmp_path):
    model, _, dataset = _setup()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=30,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    trainer = RecallTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(dataset),
        recall_loss="cdiv",
        recall_loss_params={"alpha": 1.4},
    )
    trainer.train()
    nll = [log["recall/nll"] for log in trainer.state.log_history if "recall/nll" in log]
    assert len(nll) == 6
    assert nll[-1] < nll[0] - 0.2, nll
