"""Thin integrations with trainers we do not own: Megatron (``integrations.megatron``, which imports
megatron-core only when called) and Hugging Face ``Trainer`` / TRL (``integrations.hf``).
``integrations.normalizer`` normalises over a step whose token count is not known in advance (Megatron)."""
