"""The one adapter that applies an optimizer step's gradient scale to what holds the gradients.

The scale's maths and its skip convention are the accumulator's (``recall_dist/losses/accumulator.py``:
``gradient_scale()``, ``rescale_factor``, ``SKIP``).  This module applies a scale to a plain or DDP model,
FSDP2 (DTensor gradients, shard by shard) or Megatron's DDP (``scale_gradients_``), and to a DeepSpeed ZeRO
engine (``ZeroStepScale``).  The trainer's backends (``train/backends/``), the Hugging Face integration
(``integrations/hf.py``) and Megatron's ``step_finalize`` (``integrations/megatron.py``) all go through it.
Where a scale cannot be applied it raises; it never skips a rescale silently.

A scale of ``SKIP`` (0.0) means "no update", never a division by zero:

- torch optimizers leave a parameter whose ``.grad`` is None alone (no Adam moment, no weight decay moves),
  so ``scale_gradients_`` drops the gradients;
- ZeRO keeps the gradients in its own partitions, so ``ZeroStepScale`` skips its inner optimizer's update
  (ZeRO then copies the unchanged fp32 masters back) and sets no loss scale;
- Megatron's gradient buffers (``main_grad``) cannot be dropped: they are zeroed, and Megatron's optimizer
  then steps on zero gradients.
"""

from __future__ import annotations

import contextlib
import math

import torch

from recall_dist.losses.accumulator import SKIP

# What a ZeRO optimizer needs for ``ZeroStepScale`` to rescale a step: DeepSpeed's external loss scale.
LOSS_SCALE_HOOK = ("override_loss_scale", "custom_loss_scaler", "external_loss_scale")


def check_scale(factor: float) -> None:
    """A gradient scale is finite and >= 0 (``SKIP`` = 0.0 for a skipped step)."""
    if not (isinstance(factor, int | float) and math.isfinite(factor) and factor >= 0):
        raise ValueError(f"gradient scale must be a finite number >= 0 (SKIP = 0.0 skips the step), got {factor!r}")


def scale_gradients_(modules, factor: float) -> None:
    """Multiply the accumulated gradients of ``modules`` by ``factor`` in place: ``.grad`` (plain, DDP,
    FSDP2's DTensor shards), ``.main_grad`` where Megatron keeps them, or one ``scale_gradients`` call
    for a Megatron DDP module (its gradient buffers).  ``SKIP`` drops ``.grad`` (no update; see the
    module docstring) and zeroes Megatron's buffers."""
    check_scale(factor)
    if factor == 1.0:
        return
    grads = []
    for module in modules:
        if hasattr(module, "scale_gradients"):  # Megatron DDP: one call scales its grad buffers
            module.scale_gradients(factor)
            continue
        for p in module.parameters():
            main = getattr(p, "main_grad", None)
            if main is not None:
                grads.append(main)
            elif p.grad is not None and factor == SKIP:
                p.grad = None
            elif p.grad is not None:
                grads.append(p.grad)
    if not grads:
        return
    if factor == SKIP:
        for grad in grads:
            grad.zero_()
    else:
        torch._foreach_mul_(grads, factor)


def require_loss_scale_hook(zero) -> None:
    """Raise unless the ZeRO optimizer ``zero`` has DeepSpeed's external loss scale (``LOSS_SCALE_HOOK``)."""
    missing = [name for name in LOSS_SCALE_HOOK if not hasattr(zero, name)]
    if not missing:
        return
    try:
        import deepspeed

        version = deepspeed.__version__
    except ImportError:
        version = "(not importable)"
    raise RuntimeError(
        f"DeepSpeed {version}: its optimizer {type(zero).__name__} has no external loss scale (missing: "
        f"{', '.join(missing)}).  recall_dist multiplies a step's accumulated gradients by the step's exact "
        "normaliser N / Z (recall_dist/losses/accumulator.py) through that hook, which ZeRO divides out before "
        "the gradient norm, the clipping and the update.  Needed: a ZeRO stage 1-3 optimizer with "
        f"{', '.join(LOSS_SCALE_HOOK)} (DeepSpeed 0.19.8 has them; ZeRO stage 0 with bf16 does not); or the "
        "loss option normalize='tokens', whose scale is always 1."
    )


class ZeroStepScale:
    """The step scale of one DeepSpeed engine.  ZeRO divides the accumulated gradients by its loss scale S
    before the norm, the clipping and the update, so S = 1 / g multiplies the step's gradient by g; the scale
    in place before is put back right after the step, so every other backward runs unscaled.  ``SKIP`` skips
    the inner optimizer's update instead (no 1 / 0), as does a non-finite gradient norm (with bf16 ZeRO would
    otherwise apply NaNs).

    One per engine (``for_engine``): it wraps the inner optimizer's ``step`` once.  ``rescales=True`` (the
    loss's ``normalize`` is ``weights``, so a step's scale is N / Z) requires the external loss scale now,
    not at the first step that needs it."""

    def __init__(self, engine, rescales: bool = True):
        self.engine, self.zero = engine, engine.optimizer
        if rescales:
            require_loss_scale_hook(self.zero)
        self.skip_update = False
        self._factor = 1.0
        self._saved = None  # (custom_loss_scaler, external_loss_scale) before ``arm``
        self._guard_inner_step()

    @classmethod
    def for_engine(cls, engine, rescales: bool = True) -> ZeroStepScale:
        existing = getattr(getattr(engine.optimizer, "optimizer", engine.optimizer).step, "step_scale", None)
        if existing is None:
            return cls(engine, rescales)
        if rescales:
            require_loss_scale_hook(existing.zero)
        return existing

    def _guard_inner_step(self) -> None:
        zero = self.zero
        inner = getattr(zero, "optimizer", zero)
        original = inner.step

        def guarded(*args, **kwargs):
            norm = getattr(zero, "_global_grad_norm", None)
            if self.skip_update or (norm is not None and not math.isfinite(float(norm))):
                return None
            return original(*args, **kwargs)

        guarded.step_scale = self
        inner.step = guarded

    def arm(self, factor: float) -> None:
        """Until ``disarm``, the engine's next optimizer step multiplies the accumulated gradients by
        ``factor`` (``SKIP``: skips its update).  A backward run while armed has its loss multiplied by
        ZeRO's loss scale 1 / factor: pass that loss through ``scale_loss`` first (the Hugging Face path,
        where DeepSpeed steps inside the step's last backward)."""
        check_scale(factor)
        self.disarm()
        if factor == SKIP:
            self.skip_update = True
            return
        if factor == 1.0:
            return
        zero = self.zero
        require_loss_scale_hook(zero)
        current = None if zero.custom_loss_scaler else float(getattr(zero, "loss_scale", 1.0))
        if current != 1.0:  # fp16 loss scaling, or someone else's external scale: 1 / factor would replace it
            raise RuntimeError(
                f"{type(zero).__name__} already scales the loss (custom_loss_scaler={zero.custom_loss_scaler}, "
                f"loss scale {current}): the step's gradient scale needs bf16 or fp32 without another loss scale"
            )
        self._saved = (zero.custom_loss_scaler, zero.external_loss_scale)
        self._factor = factor
        zero.override_loss_scale(1.0 / factor)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` to backpropagate while armed: times the armed factor, so ZeRO's 1 / factor cancels."""
        return loss * self._factor if self._saved is not None else loss

    def disarm(self) -> None:
        """Put back the loss scale that was in place before ``arm`` (DeepSpeed has no public call that
        undoes ``override_loss_scale``), and let the next update run."""
        if self._saved is not None:
            self.zero.custom_loss_scaler, self.zero.external_loss_scale = self._saved
            self._saved = None
        self._factor = 1.0
        self.skip_update = False

    @contextlib.contextmanager
    def applied(self, factor: float):
        """``arm(factor)`` for the body (the engine's ``step()``), ``disarm()`` after it."""
        self.arm(factor)
        try:
            yield
        finally:
            self.disarm()
