"""Thin integrations with trainers we do not own: Megatron (``integrations.megatron``) and
Hugging Face ``Trainer`` / TRL (``integrations.hf``).  Each imports its framework lazily, so
``recall_dist`` itself never needs megatron-core or TRL installed."""
