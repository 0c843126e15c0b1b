"""DeepSpeed ZeRO stage 2 / 3 engine (bf16, optional CPU offload) behind the trainer's ``Engine`` seam.

Our JSON presets (``recall_dist/presets/deepspeed/``) hold the ZeRO knobs; batch sizes, clipping, precision,
stage and offload are filled in from the ``TrainConfig`` so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import json
import math

import torch

from recall_dist.losses.accumulator import SKIP
from recall_dist.train.backends import LRSchedule, StepResult, lr_lambda, stream_full_parameters, torch_optimizer
from recall_dist.train.backends.zero_resharding import load_other_world_size, saved_dp_size
from recall_dist.train.config import TrainConfig
from recall_dist.train.lora import check_quantize_backend, trainable_parameters
from recall_dist.train.loss_head import CausalLMWithLossHead, register_zero3_head
from recall_dist.train.models import (
    build_model,
    construct,
    enable_gradient_checkpointing,
    materialize,
    quantize_if_4bit,
    weight_source,
)
from recall_dist.train.qlora import drop_four_bit_state
from recall_dist.train.step_scale import ZeroStepScale
from recall_dist.train.weights import load_weights


def deepspeed_config(cfg: TrainConfig, accumulation_steps: int, world_size: int) -> dict:
    """The DeepSpeed config dict: the JSON file, with our batch/precision/stage/offload settings."""
    with open(cfg.backend.resolved_deepspeed_config()) as f:
        ds = json.load(f)
    micro = cfg.train.micro_batch_size
    ds.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation_steps,
        train_batch_size=micro * accumulation_steps * world_size,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=2**31 - 1,
        wall_clock_breakdown=False,
        zero_allow_untested_optimizer=True,
    )
    ds["bf16"] = {"enabled": cfg.backend.bf16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.backend.zero_stage
    if cfg.backend.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.backend.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    if offloaded:  # DeepSpeed's CPU Adam steps the offloaded fp32 partitions
        ds["optimizer"] = {
            "type": "AdamW" if cfg.optim.name == "adamw" else "Adam",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
            },
        }
    else:
        ds.pop("optimizer", None)
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.pop("scheduler", None)  # ours, so that both backends share one schedule
    return ds


@contextlib.contextmanager
def _zero3_construction(ds_config: dict):
    """The contexts transformers itself enters to build a model under ZeRO-3 (``from_config`` with a live
    ``HfDeepSpeedConfig``): ``zero.Init`` partitions every parameter as its module is created, so no rank
    ever holds the full model.  Hugging Face's own initialisation is skipped (it would gather every module
    to rank 0): the weights come from ``load_weights``, partition by partition."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    deepspeed.init_distributed()  # joins our process group: zero.Init reads the world size from it
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers keeps a weakref: alive for the build
    with (
        no_init_weights(),
        prevent_arange_dtype_change(),  # before zero.Init: RoPE buffers keep their fp32 dtype
        deepspeed.zero.Init(config_dict_or_path=ds_config),
        set_zero3_state(),  # from_config must not enter a second zero.Init
    ):
        yield
    del hf_ds_config


def build_deepspeed_model(cfg: TrainConfig, ctx, ds_config: dict) -> torch.nn.Module:
    """The model of ``cfg.model`` with this rank's weights: partitioned from construction under ZeRO-3;
    under ZeRO-2 (every rank holds the parameters) materialised on the device straight from the meta
    device, in the compute dtype (DeepSpeed keeps the fp32 masters in its optimizer).  With ``model.lora``
    the frozen base and the adapters are in the compute dtype too; the optimizer holds the adapters' fp32
    masters only.  QLoRA (ZeRO-2 only): the 4-bit base computes in the compute dtype; DeepSpeed's casts skip
    its packed uint8 weights, and its broadcast from rank 0 sends the same bytes every rank quantised."""
    dtype = torch.bfloat16 if cfg.backend.bf16 else torch.float32
    check_quantize_backend(cfg.model.lora, cfg.backend)  # QLoRA: not under ZeRO-3
    if cfg.backend.zero_stage == 3:
        with _zero3_construction(ds_config):
            model = construct(cfg.model, dtype, ctx.device.type, adapter_dtype=dtype)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    else:
        model = build_model(
            cfg.model,
            meta=True,
            dtype=dtype,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            device_type=ctx.device.type,
            adapter_dtype=dtype,
        )
        materialize(model, ctx.device)
    load_weights(model, weight_source(cfg.model, model, cfg.train.seed))
    quantize_if_4bit(model, ctx.device)  # QLoRA (ZeRO-2): the 4-bit base, whole on every rank
    return model


class DeepSpeedEngine:
    """``deepspeed.initialize`` around the ``CausalLMWithLossHead``.  DeepSpeed averages gradients over
    the data-parallel ranks; the micro-batch losses are already the step's shares, so ``backward`` does not
    divide by the accumulation steps, and ``step`` applies the step's exact normaliser through the ZeRO
    optimizer's loss scale (``train/step_scale.py``: divided out before the norm, the clipping and the
    update; a DeepSpeed without that hook is an error when the loss needs it, ``normalize: weights``)."""

    def __init__(self, cfg: TrainConfig, ctx, loss, accumulation_steps: int, total_steps: int):
        import deepspeed

        self.ds_config = deepspeed_config(cfg, accumulation_steps, ctx.world_size)
        model = build_deepspeed_model(cfg, ctx, self.ds_config)
        wrapper = CausalLMWithLossHead(
            model, loss, ctx.dp_group, chunk_size=cfg.loss.chunk_size, kernel=cfg.loss.kernel_options()
        )
        if cfg.backend.zero_stage == 3:
            register_zero3_head(wrapper)
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = torch_optimizer(cfg.optim, trainable_parameters(wrapper), ctx.device.type)
        factor = lr_lambda(cfg.optim, total_steps)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=wrapper,
            model_parameters=trainable_parameters(wrapper),  # with LoRA: optimizer state for the adapters only
            optimizer=optimizer,
            config=self.ds_config,
            lr_scheduler=lambda opt: LRSchedule(opt, factor, cfg.optim.lr),
        )
        self.module = self.ds.module
        self.device = ctx.device
        self.world_size = ctx.world_size
        self.lora = cfg.model.lora is not None  # a LoRA checkpoint holds the adapters; the base is rebuilt
        if self.lora:
            # DeepSpeed's exclude_frozen_parameters drops a frozen parameter under its first name only: a
            # tied lm_head.weight (the embedding under a second name) would still be saved.
            self.ds.module_state_dict = _without_frozen_aliases(self.ds)
        self.step_scale = ZeroStepScale.for_engine(self.ds, rescales=loss.normalize == "weights")

    def forward(self, batch):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # only advances DeepSpeed's micro-step counter

    def step(self, grad_scale: float = 1.0) -> StepResult:
        with self.step_scale.applied(grad_scale):  # SKIP: ZeRO skips the update (step_scale.py)
            self.ds.step()
        skipped = grad_scale == SKIP
        norm = None if skipped else self.ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepResult(norm, skipped or (norm is not None and not math.isfinite(norm)))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: str) -> None:
        # DeepSpeed's own format: every rank writes its optimizer partition (no gather).
        self.ds.save_checkpoint(directory, tag="engine", save_latest=False, exclude_frozen_parameters=self.lora)

    def load(self, directory: str) -> None:
        saved_world = saved_dp_size(directory)
        if saved_world is not None and saved_world != self.world_size:
            load_other_world_size(self.ds, directory, saved_world, self.world_size)
            return
        path, _ = self.ds.load_checkpoint(
            directory,
            tag="engine",
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not self.lora,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")

    def full_parameters(self):
        from deepspeed.utils import safe_get_full_fp32_param

        def gather(param):
            if param.requires_grad:
                return safe_get_full_fp32_param(param)
            return gathered_module_value(param)  # a frozen LoRA base parameter has no master

        # The fp32 masters (collective under ZeRO-3), not the compute-dtype module weights.
        return stream_full_parameters(self.module.model, gather)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        return {
            name: safe_get_full_grad(p).detach().float().cpu().clone()
            for name, p in self.module.named_parameters()
            if p.requires_grad
        }


def _without_frozen_aliases(ds_engine):
    """``ds_engine.module_state_dict`` that, excluding frozen parameters, excludes every name of each."""
    state_dict = ds_engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        sd = state_dict(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            for name, param in ds_engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    sd.pop(name, None)
            drop_four_bit_state(sd, ds_engine.module)  # QLoRA: bitsandbytes' quantisation statistics
        return sd

    return module_state_dict


def gathered_module_value(param: torch.Tensor) -> torch.Tensor:
    """The full value of a module parameter: all-gathered under ZeRO-3 (collective), as it is otherwise."""
    if not hasattr(param, "ds_id"):
        return param.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()
