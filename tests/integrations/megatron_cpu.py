"""megatron-core 0.16.1 on CPU processes with gloo: the test set-up, and only the test set-up.

megatron-core assumes CUDA in three places that a GPT forward/backward reaches; each workaround
here is the smallest one, and none of them is in recall_dist:

1. RNG tracker: ``model_parallel_cuda_manual_seed`` seeds CUDA generators, and attention dropout
   forks the tracker's CUDA state.  ``initialize_rng_tracker(inference_rng_tracker=True)`` installs
   megatron's own tracker whose ``fork`` is a no-op; every dropout probability is 0 here.
2. Global memory buffer: ``GlobalMemoryBuffer.get_tensor`` allocates on
   ``torch.cuda.current_device()`` (used by the local-spec attention for its matmul input); a
   subclass that allocates on the CPU replaces the one ``initialize_model_parallel`` creates.
3. Attention mask: the local spec's attention is given an explicit causal mask ``[1, 1, s, s]``
   (True = masked), as Megatron-LM's ``get_batch`` builds it.

The no-pipelining schedule (``forward_backward_no_pipelining``) allocates its token counter on
CUDA, so ``run_microbatches`` drives Megatron's own ``forward_step`` / ``backward_step`` per
micro-batch exactly as that schedule does (and accumulates ``num_tokens`` into an int tensor, as it
does).  On a GPU the full schedule runs unchanged.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist


def init_megatron_cpu(tp: int) -> None:
    """``initialize_model_parallel(tp)`` on the running gloo world, plus workarounds 1 and 2."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuMemoryBuffer(GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            n = math.prod(tensor_shape)
            buf = self.buffer.get((name, dtype))
            if buf is None or buf.numel() < n:
                buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
            return buf[:n].view(*tensor_shape)

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ps._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()
    megatron_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def tiny_gpt(tp: int, padded_vocab: int, seq: int, **overrides):
    """A 2-layer megatron-core ``GPTModel`` (local layer spec, fp32, no dropout) on the CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        **overrides,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded_vocab,
        max_sequence_length=seq,
    )


def causal_mask(seq: int) -> torch.Tensor:
    return torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)


def full_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or gradient) of ``model`` with its TP shards gathered along the partition
    dimension megatron recorded on it: the TP=1 layout of the same model."""
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out


def run_microbatches(forward_step_func, batches: list, model) -> tuple[list[dict], torch.Tensor]:
    """One step's forward/backward over ``batches`` with megatron's ``forward_step`` and
    ``backward_step``, as ``forward_backward_no_pipelining`` runs them.  Returns the loss reports
    (one dict per micro-batch) and the int total of ``num_tokens``."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    data = iter(batches)
    store: list = []
    total_num_tokens = torch.zeros([], dtype=torch.int)
    for i in range(len(batches)):
        output_tensor, num_tokens = forward_step(
            forward_step_func,
            data,
            model,
            len(batches),
            None,
            store,
            config,
            1,
            is_first_microbatch=i == 0,
            current_microbatch=i,
        )
        total_num_tokens += num_tokens
        backward_step(None, output_tensor, None, ModelType.encoder_or_decoder, config)
    return store, total_num_tokens


def reduce_reports(reports: list[dict]) -> dict[str, float]:
    """Megatron-LM's ``train_step`` reduction: a ``[num, den]`` pair is summed over micro-batches,
    all-reduced over the data-parallel group, then divided."""
    from megatron.core import parallel_state as ps

    out = {}
    for key in reports[0]:
        val = torch.vstack([r[key].view(-1) for r in reports]).sum(dim=0)
        dist.all_reduce(val, group=ps.get_data_parallel_group())
        out[key] = float(val[0] / val[1])
    return out
