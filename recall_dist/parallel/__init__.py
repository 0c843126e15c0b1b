"""The parallel kernels: the recall loss from a vocab-parallel logits shard, or fused with the
output projection from hidden states, normalised over the data-parallel group.  ``KernelOptions``
says how they run (``docs/kernels.md``)."""

from recall_dist.parallel.common import LossOutput
from recall_dist.parallel.fused_linear import fused_linear_loss
from recall_dist.parallel.options import KernelOptionError, KernelOptions
from recall_dist.parallel.vocab_parallel import vocab_parallel_loss

__all__ = ["KernelOptionError", "KernelOptions", "LossOutput", "fused_linear_loss", "vocab_parallel_loss"]
