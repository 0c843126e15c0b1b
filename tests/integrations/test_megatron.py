"""Our loss inside real megatron-core 0.16.1 (2 gloo CPU processes, TP = 2; then TP = 1, DP = 2).

- ``nll`` through ``loss_func`` equals megatron-core's ``vocab_parallel_cross_entropy`` with a
  masked mean (value, gradient of the logits shard), and Megatron's own ``GPTModel`` loss
  (``labels=...``) on a tiny model (value, gradient of every parameter);
- the README's ``forward_step`` trains a tiny ``GPTModel`` (c-Div, padded vocabulary, 2 micro-batches
  through Megatron's ``forward_step``/``backward_step``): finite, falling loss; one step's gradient at
  TP = 2 equals the same model's at TP = 1 with DP = 2; the README's step normaliser makes 2
  micro-batches give the gradient of one batch (and without it they measurably do not); the fused
  output layer gives the logits path's loss and gradients.

CPU workarounds (test set-up only): ``tests/integrations/megatron_cpu.py``.  Measured numbers are
printed (``pytest -s``).
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from recall_dist.distributed.testing import run_distributed_test
from tests.integrations.megatron_cpu import (
    causal_mask,
    full_tensors,
    init_megatron_cpu,
    reduce_reports,
    run_microbatches,
    tiny_gpt,
)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SEQ, PADDED_VOCAB, REAL_VOCAB = 8, 64, 60


def readme_block(marker: str) -> str:
    return next(b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b)


def report(name: str, value: float) -> None:
    if dist.get_rank() == 0:
        print(f"[megatron] {name}: {value:.3e}", flush=True)


def max_abs(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------- nll == megatron-core's own loss


def _nll_parity():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from recall_dist import build_loss
    from recall_dist.integrations.megatron import loss_func

    init_megatron_cpu(tp=2)
    rank, shard = ps.get_tensor_model_parallel_rank(), PADDED_VOCAB // 2
    g = torch.Generator().manual_seed(0)
    full = 3 * torch.randn(2, SEQ, PADDED_VOCAB, generator=g)
    labels = torch.randint(0, PADDED_VOCAB, (2, SEQ), generator=g)
    mask = (torch.rand(2, SEQ, generator=g) > 0.25).float()
    nll = build_loss("nll")

    ours_in = full[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
    ours, num_tokens, rep = loss_func(mask, ours_in, labels=labels, loss=nll)
    ours.backward()
    theirs_in = ours_in.detach().clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(theirs_in.transpose(0, 1).contiguous(), labels.t().contiguous()).t()
    theirs = (per_token * mask).sum() / mask.sum()
    theirs.backward()
    assert num_tokens.dtype == torch.int32 and int(num_tokens) == 1
    assert abs(float(ours) - float(theirs)) < 5e-7
    assert float(rep["lm loss"][0] / rep["lm loss"][1]) == pytest.approx(float(theirs), abs=5e-7)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)  # a few fp32 ulps
    report("vocab_parallel_cross_entropy: max |loss diff|", abs(float(ours) - float(theirs)))
    report(
        "vocab_parallel_cross_entropy: max |grad diff| (logits shard)",
        float((ours_in.grad - theirs_in.grad).abs().max()),
    )

    # Megatron's own GPTModel loss (labels=..., masked mean as in pretrain_gpt) vs our loss_func
    torch.manual_seed(1)
    model = tiny_gpt(2, PADDED_VOCAB, SEQ)
    tokens = torch.randint(0, PADDED_VOCAB, (2, SEQ), generator=g)
    position_ids = torch.arange(SEQ).expand(2, SEQ)
    per_token = model(tokens, position_ids, causal_mask(SEQ), labels=labels)
    theirs = (per_token * mask).sum() / mask.sum()
    theirs.backward()
    theirs_grads = full_tensors(model, grads=True)
    model.zero_grad()
    ours, _, _ = loss_func(mask, model(tokens, position_ids, causal_mask(SEQ)), labels=labels, loss=nll)
    ours.backward()
    ours_grads = full_tensors(model, grads=True)
    assert abs(float(ours) - float(theirs)) < 1e-6
    assert max_abs(ours_grads, theirs_grads) < 1e-6
    report("GPTModel(labels=...) loss: |loss diff|", abs(float(ours) - float(theirs)))
    report("GPTModel(labels=...) loss: max |param grad diff|", max_abs(ours_grads, theirs_grads))


# ---------------------------------------------------------------- training with the README snippet


def _batches(micro_batches: int, rows: int, rank_rows: slice | None = None) -> list[dict]:
    """Fixed data: tokens below the real vocabulary, next-token labels, a loss mask with holes."""
    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, REAL_VOCAB, (micro_batches * rows, SEQ + 1), generator=g)
    mask = (torch.rand(micro_batches * rows, SEQ, generator=g) > 0.2).float()
    out = []
    for i in range(micro_batches):
        rows_i = slice(i * rows, (i + 1) * rows)
        b = {
            "tokens": tokens[rows_i, :-1],
            "labels": tokens[rows_i, 1:],
            "loss_mask": mask[rows_i],
            "attention_mask": causal_mask(SEQ),
            "position_ids": torch.arange(SEQ).expand(rows, SEQ),
        }
        if rank_rows is not None:
            b = {k: v if k == "attention_mask" else v[rank_rows] for k, v in b.items()}
        out.append(b)
    return out


def _readme_namespace(step_block: bool, dp_average=None, config=None) -> dict:
    """The README's Megatron code, executed with what Megatron-LM's pretrain_gpt.py provides
    (``config``: the model's, whose ``finalize_model_grads_func`` the step block sets)."""

    def get_batch(data_iterator):
        b = next(data_iterator)
        return b["tokens"], b["labels"], b["loss_mask"], b["attention_mask"], b["position_ids"]

    ns = {"get_batch": get_batch, "get_tokenizer": lambda: types.SimpleNamespace(vocab_size=REAL_VOCAB)}
    exec(compile(readme_block("integrations.megatron import loss_func"), "README.md", "exec"), ns)
    if step_block:
        ns["config"] = types.SimpleNamespace(finalize_model_grads_func=None) if config is None else config
        ns["finalize_model_grads"] = dp_average
        exec(compile(readme_block("step_finalize"), "README.md", "exec"), ns)
    return ns


def _dp_average(models, *args, **kwargs):
    """What Megatron's DDP + finalize_model_grads do for a bare module: average gradients over DP."""
    from megatron.core import parallel_state as ps

    group, dp = ps.get_data_parallel_group(), ps.get_data_parallel_world_size()
    for model in models:
        for p in model.parameters():
            if dp > 1:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(dp)


def _step_grads(model, ns, batches) -> tuple[dict, dict]:
    model.zero_grad()
    reports, total_num_tokens = run_microbatches(ns["forward_step"], batches, model)
    assert total_num_tokens.dtype == torch.int32 and int(total_num_tokens) == len(batches)
    finalize = ns["config"].finalize_model_grads_func if "config" in ns else _dp_average
    finalize([model], total_num_tokens)
    return full_tensors(model, grads=True), reduce_reports(reports)


def _train_tp2_then_tp1():
    from recall_dist.integrations.megatron import use_fused_output_layer

    init_megatron_cpu(tp=2)
    torch.manual_seed(0)
    model = tiny_gpt(2, PADDED_VOCAB, SEQ)
    weights = full_tensors(model)
    plain, stepped = _readme_namespace(False), _readme_namespace(True, _dp_average)
    two_mb, one_mb = _batches(2, 2), _batches(1, 4)

    grads_tp2, log_tp2 = _step_grads(model, plain, two_mb)
    grads_step, log_step = _step_grads(model, stepped, two_mb)
    grads_one, log_one = _step_grads(model, plain, one_mb)
    # Z over the whole step: 2 micro-batches give the one batch's gradient and objective ...
    assert max_abs(grads_step, grads_one) < 1e-6 and log_step["lm loss"] == pytest.approx(log_one["lm loss"], rel=1e-6)
    # ... which a per-micro-batch Z (the two-line form) measurably does not
    assert max_abs(grads_tp2, grads_one) > 1e-4
    report("TP=2, 2 micro-batches, step normaliser vs 1 batch: max |grad diff|", max_abs(grads_step, grads_one))
    report("TP=2, 2 micro-batches, per-micro-batch Z vs 1 batch: max |grad diff|", max_abs(grads_tp2, grads_one))

    # fused output layer: same loss and gradients as the logits path, no logits
    fused_model = tiny_gpt(2, PADDED_VOCAB, SEQ)
    fused_model.load_state_dict(model.state_dict())
    fused = _readme_namespace(False)
    fused["recall"]["output_weight"] = use_fused_output_layer(fused_model)
    grads_fused, log_fused = _step_grads(fused_model, fused, two_mb)
    assert max_abs(grads_fused, grads_tp2) < 1e-6 and log_fused["lm loss"] == pytest.approx(
        log_tp2["lm loss"], rel=1e-6
    )
    report("fused output layer vs logits: max |grad diff|", max_abs(grads_fused, grads_tp2))

    # a few optimizer steps: finite, falling loss
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        _, log = _step_grads(model, plain, two_mb)
        optimizer.step()
        losses.append(log["lm loss"])
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    if dist.get_rank() == 0:
        print(f"[megatron] TP=2 c-Div lm loss over 5 steps: {[round(v, 4) for v in losses]}", flush=True)

    # the same model at TP = 1 (DP = 2, one row of each micro-batch per rank), from the same weights
    init_megatron_cpu(tp=1)
    model1 = tiny_gpt(1, PADDED_VOCAB, SEQ)
    missing = model1.load_state_dict(weights, strict=False).missing_keys
    assert not set(missing) & set(weights), missing
    rows = slice(dist.get_rank(), dist.get_rank() + 1)
    grads_tp1, log_tp1 = _step_grads(model1, _readme_namespace(False), _batches(2, 2, rows))
    assert max_abs(grads_tp1, grads_tp2) < 1e-6 and log_tp1["lm loss"] == pytest.approx(log_tp2["lm loss"], rel=1e-6)
    report("TP=2 vs TP=1 (DP=2) one-step gradient: max |diff|", max_abs(grads_tp1, grads_tp2))
    report("TP=2 vs TP=1 (DP=2) logged lm loss: |diff|", abs(log_tp1["lm loss"] - log_tp2["lm loss"]))
    grads_tp1_step, _ = _step_grads(model1, _readme_namespace(True, _dp_average), _batches(2, 2, rows))
    assert max_abs(grads_tp1_step, grads_one) < 1e-6


def _suite():
    _nll_parity()
    _train_tp2_then_tp1()


@pytest.mark.slow
def test_megatron_core_parity_and_readme_training():
    """Both parts in one pair of processes: importing megatron-core costs ~15 s per process."""
    run_distributed_test(_suite, 2)
