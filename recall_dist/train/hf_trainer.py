"""``RecallTrainer`` moved to ``recall_dist.integrations.hf`` (with the TRL mixin); this module keeps
``from recall_dist.train.hf_trainer import RecallTrainer`` working."""

from recall_dist.integrations.hf import RecallTrainer, RecallTrainerMixin, default_dp_group, recall_compute_loss

__all__ = ["RecallTrainer", "RecallTrainerMixin", "default_dp_group", "recall_compute_loss"]
