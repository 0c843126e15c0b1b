"""recall_dist: Recall-oriented LM training losses (Verine et al., ICML 2025) as one
vocabulary-parallel, memory-efficient loss for DeepSpeed ZeRO / FSDP2, plus a temperature sweep.

Public API (names are stable)::

    from recall_dist import build_loss, vocab_parallel_loss, fused_linear_loss, RollingQuantileBuffer
"""

from recall_dist.distributed.buffer import RollingQuantileBuffer
from recall_dist.losses import RecallLoss, WeightRule, build_loss, known_rules, register_rule
from recall_dist.parallel import LossOutput, fused_linear_loss, vocab_parallel_loss

__all__ = [
    "LossOutput",
    "RecallLoss",
    "RollingQuantileBuffer",
    "WeightRule",
    "build_loss",
    "fused_linear_loss",
    "known_rules",
    "register_rule",
    "vocab_parallel_loss",
]
__version__ = "0.1.0"
