"""Thin integrations with trainers we do not own: Megatron (``integrations.megatron``, which
imports megatron-core only when called) and Hugging Face ``Trainer`` / TRL (``integrations.hf``);
``integrations.step`` holds the step-level normalisation both use for gradient accumulation."""
