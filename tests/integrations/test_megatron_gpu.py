"""On a CUDA device: megatron-core's own no-pipelining schedule (``get_forward_backward_func``) with
its ``DistributedDataParallel`` and ``finalize_model_grads``, which the CPU tests replace by driving
``forward_step``/``backward_step`` and averaging by hand (the schedule and DDP allocate on CUDA).

For both ``calculate_per_token_loss`` modes: the README's two-line ``loss_func`` gives the same
gradient (num_tokens = 1 makes the modes agree), and with the README's step normaliser installed as
``finalize_model_grads_func`` 2 micro-batches give the gradient of one batch of 4.
Run: ``pytest -m gpu tests/integrations/test_megatron_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from recall_dist.distributed.testing import run_distributed_test
from tests.integrations.megatron_cpu import reduce_reports, tiny_gpt
from tests.integrations.test_megatron import PADDED_VOCAB, SEQ, _batches, _readme_namespace

pytestmark = pytest.mark.gpu


def _schedule_grads(per_token: bool, step_block: bool, batches: list[dict]) -> tuple[dict, float]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    torch.manual_seed(0)
    model = tiny_gpt(1, PADDED_VOCAB, SEQ, calculate_per_token_loss=per_token).cuda()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    ns = _readme_namespace(step_block, finalize_model_grads, model.config)  # the step block replaces it
    model.config.no_sync_func = ddp.no_sync
    cuda = [{k: v.cuda() for k, v in b.items()} for b in batches]
    reports = get_forward_backward_func()(
        forward_step_func=ns["forward_step"],
        data_iterator=iter(cuda),
        model=[ddp],
        num_microbatches=len(cuda),
        seq_length=SEQ,
        micro_batch_size=cuda[0]["tokens"].shape[0],
        forward_only=False,
    )
    grads = {n: p.main_grad.detach().float().cpu().clone() for n, p in ddp.module.named_parameters()}
    return grads, reduce_reports(reports)["lm loss"]


def _full_schedule():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.cuda.set_device(0)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    two, one = _batches(2, 2), _batches(1, 4)

    def max_abs(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    one_grads, one_loss = _schedule_grads(False, False, one)
    plain = {mode: _schedule_grads(mode, False, two) for mode in (False, True)}
    assert max_abs(plain[True][0], plain[False][0]) < 1e-6  # num_tokens = 1: both modes agree
    for mode in (False, True):
        grads, loss = _schedule_grads(mode, True, two)
        assert max_abs(grads, one_grads) < 1e-6 and loss == pytest.approx(one_loss, rel=1e-6)
        diff = max_abs(grads, one_grads)
        print(f"[megatron gpu] per_token={mode}: step normaliser vs 1 batch, max |grad diff| {diff:.3e}")


def test_full_megatron_schedule_and_ddp_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    run_distributed_test(_full_schedule, 1, backend="nccl")
