"""Training: a trainer for Hugging Face causal LMs with the recall loss owning the output layer,
on DeepSpeed ZeRO (2/3) or FSDP2, with atomic checkpoints, preemption handling and HF export.

Entry points: ``recall-dist train CONFIG.yaml``, ``run_training(cfg)`` (Ray Train workers),
``recall-dist plan CONFIG.yaml``, and ``RecallTrainer`` for ``transformers.Trainer`` users.
"""
