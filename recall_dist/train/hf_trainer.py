"""``transformers.Trainer`` / TRL users: switch to c-Div (or any recall loss) in a few lines.

    from recall_dist.train.hf_trainer import RecallTrainer

    trainer = RecallTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                            recall_loss="cdiv", recall_loss_params={"alpha": 1.4})
    trainer.train()

or, in your own ``Trainer`` subclass (e.g. a TRL ``SFTTrainer``)::

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return recall_compute_loss(model, inputs, self.recall_loss, return_outputs=return_outputs)

Labels follow the Hugging Face convention (aligned with ``input_ids``, -100 where no loss; shifted
here).  The model runs through its wrapper (DDP sees the forward) with ``logits_to_keep=1``, so only
one position's logits are formed; the fused loss does the head matmul from the final hidden states.
Scope: one device, DDP and ZeRO-1/2.  Under ZeRO-3 or FSDP the head weight must be gathered inside a
module's forward: use ``recall-dist train`` (``recall_dist.train.loss_head``) there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import Trainer

from recall_dist import build_loss, fused_linear_loss


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def default_dp_group():
    """The world group when training on several processes (DDP), else None."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def recall_compute_loss(
    model, inputs: dict, loss, dp_group="auto", chunk_size: int | None = None, return_outputs: bool = False
):
    """The recall loss of a Hugging Face causal LM on ``inputs`` (``input_ids``, ``labels``,
    optional ``attention_mask``).  ``dp_group="auto"``: the world group under DDP, so that the
    averaged gradient is the global objective's (README, "How the losses work")."""
    dp_group = default_dp_group() if dp_group == "auto" else dp_group
    labels = inputs["labels"]
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = outputs.hidden_states[-1]  # after the final norm: what lm_head consumes
    weight = _unwrap(model).get_output_embeddings().weight
    out = fused_linear_loss(
        hidden[:, :-1],
        weight,
        labels[:, 1:],
        loss,
        dp_group=dp_group,
        vocab_size=_unwrap(model).config.vocab_size,
        chunk_size=chunk_size,
    )
    return (out.loss, {"stats": out.stats}) if return_outputs else out.loss


class RecallTrainer(Trainer):
    """``transformers.Trainer`` whose loss is a recall loss (``build_loss(recall_loss, **params)``).

    The last step's loss statistics (weight mean/max, ESS, kept fraction, tau, ...) are logged
    with Trainer's own logs, prefixed ``recall/``.
    """

    def __init__(
        self,
        *args,
        recall_loss: str = "cdiv",
        recall_loss_params: dict | None = None,
        chunk_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.recall_loss = build_loss(recall_loss, **(recall_loss_params or {}))
        self.chunk_size = chunk_size
        self.last_recall_stats: dict[str, float] = {}
        # Our loss is a per-micro-batch objective: let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, extra = recall_compute_loss(
            model, inputs, self.recall_loss, chunk_size=self.chunk_size, return_outputs=True
        )
        self.last_recall_stats = extra["stats"]
        return (loss, extra) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **{f"recall/{k}": v for k, v in self.last_recall_stats.items()}}
        super().log(logs, *args, **kwargs)
