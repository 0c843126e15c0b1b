"""Real ``transformers.Trainer`` / TRL ``SFTTrainer`` runs (transformers 5.24, TRL 1.16) with the
recall loss mixed in, on a tiny Llama and raw text ("a*b=c"), packed by TRL:

- the fused head is used (lm_head forms one position's logits per row) and the flash-attention
  varlen arguments reach the model;
- gradient accumulation 2 x 4 gives the gradient, the SGD update and the logged loss of one batch
  of 8 (c-Div: Z over the whole step), and both equal a full-logits reference;
- a packed batch: our ``nll`` equals TRL's own SFT loss and the same sequences run unpacked;
  sequence-level TruncR sees sequences (packed == unpacked), not rows;
- DeepSpeed ZeRO-3 on 2 gloo processes with the head weight partitioned: the update and logged
  loss equal the full-logits reference on the global batch (c-Div, also with 2 micro-batches per
  rank: the step's rescale goes through ZeRO's loss scale);
- the README's TRL recipe runs as written.

Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import trl
from transformers import TrainerCallback

from recall_dist import build_loss
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.integrations.hf import RecallTrainerMixin, recall_compute_loss, sequence_ids_from_positions
from tests.integrations.hf_setup import char_tokenizer, reference_loss, text_dataset, tiny_llama

ALPHA = 1.4


class RecallSFTTrainer(RecallTrainerMixin, trl.SFTTrainer):
    """The README's recipe, plus a record of the first optimizer step's micro-batches."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._objective is not None and self.state.global_step == 0:  # inside a training step
            self.first_step_batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class FirstStepGrads(TrainerCallback):
    """The gradients the optimizer sees at the first step (after accumulation, before the update)."""

    grads: dict | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def sft_config(tmp, **overrides):
    values = {
        "output_dir": str(tmp),
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 0.05,
        "optim": "sgd",
        "max_grad_norm": 0.0,  # no clipping: the update is proportional to the gradient
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "packing": True,
        "max_length": 32,
        "seed": 0,
    }
    return trl.SFTConfig(**(values | overrides))


def run_sft(tmp, **overrides):
    callback = FirstStepGrads()
    trainer = RecallSFTTrainer(
        model=tiny_llama(0),
        args=sft_config(tmp, **overrides),
        train_dataset=text_dataset(64),
        processing_class=char_tokenizer(),
        recall_loss="cdiv",
        recall_loss_params={"alpha": ALPHA},
        callbacks=[callback],
    )
    trainer.first_step_batches = []
    logits_rows, model_kwargs = [], []
    trainer.model.lm_head.register_forward_hook(lambda m, i, out: logits_rows.append(out.shape[-2]))
    trainer.model.register_forward_pre_hook(lambda m, a, kw: model_kwargs.append(set(kw)), with_kwargs=True)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, callback.grads, losses, logits_rows, model_kwargs


def max_abs(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_trl_accumulation_2x4_equals_one_batch_of_8(tmp_path):
    one, grads_8, losses_8, logits_rows, model_kwargs = run_sft(tmp_path / "b8")
    acc, grads_4x2, losses_4x2, _, _ = run_sft(
        tmp_path / "b4x2", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )

    # the fused head: lm_head only ever formed one position's logits; packing reached the model
    assert logits_rows and set(logits_rows) == {1}
    assert {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= model_kwargs[0]

    # the same gradient, update and logged loss
    scale = max(float(g.abs().max()) for g in grads_8.values())
    assert max_abs(grads_4x2, grads_8) < 1e-5 * scale
    params_8, params_4x2 = dict(one.model.named_parameters()), dict(acc.model.named_parameters())
    assert max_abs(params_4x2, params_8) < 1e-6
    assert losses_4x2 == pytest.approx(losses_8, rel=1e-6, abs=0)

    # ... which are the full-logits reference of the step's two micro-batches together
    model = tiny_llama(0)
    reference_loss(model, acc.first_step_batches, ALPHA).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(acc.first_step_batches) == 2
    assert max_abs(grads_4x2, reference) < 1e-5 * scale
    assert losses_4x2[0] == pytest.approx(float(reference_loss(tiny_llama(0), acc.first_step_batches, ALPHA)), rel=1e-6)
    # and a Z per micro-batch (the mean of the two micro-batches' objectives) is measurably different
    model.zero_grad()
    sum(reference_loss(model, [b], ALPHA) for b in acc.first_step_batches).div(2).backward()
    per_micro_batch = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max_abs(per_micro_batch, reference) > 100 * max_abs(grads_4x2, reference)
    print(
        f"\n[trl] 2x4 vs 8: max |grad diff| {max_abs(grads_4x2, grads_8):.3e} (max |grad| {scale:.3e}), "
        f"max |param diff| after 2 SGD steps {max_abs(params_4x2, params_8):.3e}, "
        f"logged loss {losses_4x2} vs {losses_8}; vs full-logits reference {max_abs(grads_4x2, reference):.3e}; "
        f"per-micro-batch Z would differ by {max_abs(per_micro_batch, reference):.3e}"
    )


def _unpack(batch: dict) -> dict:
    """The sequences of a padding-free packed row as right-padded rows with an attention mask."""
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    spans = [(a, b) for a, b in itertools.pairwise(starts) if b - a > 1]
    width = max(b - a for a, b in spans)
    out = {"input_ids": torch.zeros(len(spans), width, dtype=torch.long)}
    out["labels"] = torch.full((len(spans), width), -100, dtype=torch.long)
    out["attention_mask"] = torch.zeros(len(spans), width, dtype=torch.long)
    for r, (a, b) in enumerate(spans):
        out["input_ids"][r, : b - a] = batch["input_ids"][0, a:b]
        out["labels"][r, : b - a] = batch["labels"][0, a:b]
        out["attention_mask"][r, : b - a] = 1
    return out


def test_packed_batch_sequences_are_kept_apart(tmp_path):
    args = sft_config(tmp_path)
    data, tok = text_dataset(64), char_tokenizer()
    model = tiny_llama(0)
    ours = RecallSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, recall_loss="nll")
    batch = next(iter(ours.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) > 8  # one packed row
    unpacked = _unpack(batch)

    nll = float(recall_compute_loss(model, batch, build_loss("nll")))
    sft = trl.SFTTrainer(model=model, args=copy.deepcopy(args), train_dataset=data, processing_class=tok)
    with torch.no_grad():
        trl_own = float(sft.compute_loss(model, dict(batch)))
        unpacked_reference = float(reference_loss(model, [unpacked], None))
    assert nll == pytest.approx(trl_own, abs=1e-6) and nll == pytest.approx(unpacked_reference, abs=1e-6)

    # sequence-level TruncR: the packed row's sequences are the unpacked rows (same kept set, loss, gradient)
    def truncr(inputs, **kw):
        model.zero_grad()
        truncr_loss = build_loss("truncr", drop=0.5, granularity="sequence", min_count=1)
        loss = recall_compute_loss(model, inputs, truncr_loss, **kw)
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_value, packed_grads = truncr(batch)
    unpacked_value, unpacked_grads = truncr(unpacked)
    assert packed_value == pytest.approx(unpacked_value, abs=1e-6) and max_abs(packed_grads, unpacked_grads) < 1e-6
    ids = sequence_ids_from_positions(batch["position_ids"])
    assert int(ids.max()) + 1 == int((batch["position_ids"] == 0).sum())
    print(
        f"\n[trl] packed batch: our nll {nll:.7f}, TRL's own SFT loss {trl_own:.7f}, unpacked reference "
        f"{unpacked_reference:.7f}; TruncR packed vs unpacked |loss diff| {abs(packed_value - unpacked_value):.2e}, "
        f"max |grad diff| {max_abs(packed_grads, unpacked_grads):.2e}"
    )


ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny params
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": "auto",  # = max_grad_norm (0: off); DeepSpeed's own default clips at 1.0
}


def _zero3_step(tmp, loss: str, alpha: float | None, **overrides) -> tuple[float, float]:
    """One ZeRO-3 SGD step on every rank's batches vs the full-logits reference on the global batch,
    from the same weights: (|logged loss - reference|, max |parameter difference|)."""
    import deepspeed
    import torch.distributed as dist

    trainer = RecallSFTTrainer(
        model=tiny_llama(0),
        args=sft_config(tmp, max_steps=1, deepspeed=ZERO3, **overrides),
        train_dataset=text_dataset(64),
        processing_class=char_tokenizer(),
        recall_loss=loss,
        recall_loss_params={} if alpha is None else {"alpha": alpha},
    )
    trainer.first_step_batches = []
    trainer.train()
    head = trainer.model.lm_head.weight
    assert head.ds_numel == head.ds_shape.numel() > 0 and head.numel() == 0  # partitioned outside a forward
    batches = [None] * dist.get_world_size()
    dist.all_gather_object(batches, trainer.first_step_batches)  # the global batch: every rank's micro-batches
    reference_model = tiny_llama(0)
    reference = reference_loss(reference_model, [b for rank in batches for b in rank], alpha)
    reference.backward()
    expected = dict(reference_model.named_parameters())
    diffs = []
    for name, p in trainer.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            diffs.append(float((p.detach() - (expected[name] - 0.05 * expected[name].grad)).abs().max()))
    return abs(trainer.state.log_history[0]["loss"] - float(reference)), max(diffs)


def _zero3_two_ranks(tmp):
    import torch.distributed as dist

    # c-Div with 2 micro-batches of 2 per rank (the global batch of 8): the head weight is gathered in
    # every forward, and the step's N / Z goes through ZeRO's loss scale.
    acc_loss_diff, acc_param_diff = _zero3_step(
        f"{tmp}/cdiv_acc", "cdiv", ALPHA, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert acc_loss_diff < 1e-5 and acc_param_diff < 1e-6
    if dist.get_rank() == 0:
        print(f"\n[trl] ZeRO-3, 2 ranks x 2 micro-batches, vs full-logits reference: cdiv |logged loss diff| "
              f"{acc_loss_diff:.2e}, max |param diff| after one SGD step {acc_param_diff:.3e}", flush=True)  # fmt: skip


@pytest.mark.slow
def test_zero3_gathers_the_head_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_distributed_test(_zero3_two_ranks, 2, str(tmp_path))


def test_readme_trl_recipe_runs(tmp_path, monkeypatch):
    """The README's TRL code, run as written on a tiny model and raw text.  This machine has no GPU,
    so ``SFTConfig`` gets ``use_cpu=True, bf16=False`` (its bf16 default needs one) and 2 steps."""
    cpu_config = functools.partial(trl.SFTConfig, use_cpu=True, bf16=False, max_steps=2, report_to=[])
    monkeypatch.setattr(trl, "SFTConfig", cpu_config)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "RecallTrainerMixin, SFTTrainer" in b
    )
    model = tiny_llama(0)
    rows = []
    model.lm_head.register_forward_hook(lambda m, i, out: rows.append(out.shape[-2]))
    ns = {"output_dir": str(tmp_path), "model": model, "dataset": text_dataset(64), "tokenizer": char_tokenizer()}
    exec(compile(code, "README.md", "exec"), ns)
    trainer = ns["trainer"]
    assert trainer.state.global_step > 0 and set(rows) == {1}
    assert trainer.last_recall_stats["tokens"] > 0 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_nll_mix_over_accumulated_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("nll_mix=0.5 and normalize='weights'")):
        RecallSFTTrainer(
            model=tiny_llama(0),
            args=sft_config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2),
            train_dataset=text_dataset(8),
            processing_class=char_tokenizer(),
            recall_loss="cdiv",
            recall_loss_params={"nll_mix": 0.5},
        )


def test_the_kernel_choice_is_read_once_at_the_start(tmp_path, monkeypatch):
    """``RecallTrainer`` merges the ``RECALL_DIST_*`` variables when it is constructed, and the head that
    ``recall_compute_loss`` attaches when it is attached (docs/kernels.md): a variable changed later
    changes nothing (a head that read it again would raise on these values)."""
    from recall_dist.parallel import KernelOptions
    from recall_dist.train import loss_head

    seen, real = [], loss_head.fused_linear_loss
    monkeypatch.setattr(loss_head, "fused_linear_loss", lambda *a, **k: seen.append(k["kernel"]) or real(*a, **k))
    monkeypatch.setenv("RECALL_DIST_KERNEL", "torch")
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", "cublas")
    trainer = RecallSFTTrainer(
        model=tiny_llama(0),
        args=sft_config(tmp_path, max_steps=1),
        train_dataset=text_dataset(8),
        processing_class=char_tokenizer(),
        recall_loss="nll",
    )
    trainer.first_step_batches = []  # RecallSFTTrainer's record
    resolved = KernelOptions("torch", "recompute", "cublas")
    assert trainer.recall_kernel == resolved
    monkeypatch.setenv("RECALL_DIST_KERNEL", "fast")
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", "cutlass")
    trainer.train()
    assert seen and all(options == resolved for options in seen), seen
    # recall_compute_loss: the head reads the variables when it is attached (the first call), then never
    monkeypatch.setenv("RECALL_DIST_KERNEL", "torch")
    monkeypatch.delenv("RECALL_DIST_HEAD_MATMUL")
    model, seen[:] = tiny_llama(0), []
    ids = torch.randint(3, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    recall_compute_loss(model, {"input_ids": ids, "labels": ids}, build_loss("nll"), dp_group=None)
    monkeypatch.setenv("RECALL_DIST_KERNEL", "fast")
    recall_compute_loss(model, {"input_ids": ids, "labels": ids}, build_loss("nll"), dp_group=None)
    assert seen == [KernelOptions("torch")] * 2
