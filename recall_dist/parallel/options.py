"""How the loss kernels run (never what they compute): ``KernelOptions``, the one place their choices,
allowed values, defaults and environment overrides are defined (``docs/kernels.md``).

A training config's ``loss.kernel``, ``loss.head_schedule``, ``loss.head_matmul`` and ``loss.triton_tiles``
build one (``LossConfig``, validated with the config).  The environment (``KernelOptions.from_env``: a
``RECALL_DIST_*`` variable that is set wins) is merged once, when a run starts (``TrainConfig.with_environment``,
``RecallTrainer``'s construction); the loss head passes that frozen object to ``fused_linear_loss`` /
``vocab_parallel_loss`` as ``kernel=``, and the kernels read their choices from it.
The options never depend on the weight rule (a rule that cannot run a schedule falls back by a property of
the loss, ``single_pass``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

KERNELS = ("auto", "torch", "triton")
HEAD_SCHEDULES = ("recompute", "single")
HEAD_MATMULS = ("triton", "cublas")

# The environment variable that overrides each option when it is set.
ENV = {
    "kernel": "RECALL_DIST_KERNEL",
    "head_schedule": "RECALL_DIST_HEAD_SCHEDULE",
    "head_matmul": "RECALL_DIST_HEAD_MATMUL",
    "triton_tiles": "RECALL_DIST_TRITON_TILES",
}

TILES_ALLOWED = (
    "null (the default tiles) or 6 integers block_n, block_v, block_k, num_warps, num_stages, splits "
    "(block sizes powers of 2 >= 16, num_warps a power of 2, num_stages and splits >= 1), e.g. 128,128,64,8,3,16"
)


class KernelOptionError(ValueError):
    """A kernel option with a value that is not allowed; ``key`` names it (``kernel``, ...) and ``source``
    says where the value came from (the option itself, or its environment variable)."""

    def __init__(self, key: str, value, allowed: str, source: str | None = None):
        self.key, self.value, self.allowed, self.source = key, value, allowed, source or key
        super().__init__(f"{self.source}={value!r} is not allowed; allowed: {allowed}")


def _power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def parse_tiles(value, key: str = "triton_tiles", source: str | None = None) -> tuple[int, ...] | None:
    """``triton_tiles`` from a sequence of 6 integers or a ``"bn,bv,bk,warps,stages,splits"`` string
    (``None``/empty: the defaults)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        tiles = tuple(int(v) if isinstance(v, str) or type(v) is int else None for v in items)
    except (TypeError, ValueError):
        tiles = ()
    ok = len(tiles) == 6 and None not in tiles and all(_power_of_two(b) and b >= 16 for b in tiles[:3])
    if not (ok and _power_of_two(tiles[3]) and tiles[4] >= 1 and tiles[5] >= 1):
        raise KernelOptionError(key, value, TILES_ALLOWED, source)
    return tiles


@dataclass(frozen=True)
class KernelOptions:
    """The kernel choices of one loss call (see ``docs/kernels.md``).

    ``kernel``: ``auto`` (Triton for CUDA tensors when ``triton`` is importable, else PyTorch), ``torch``,
    ``triton``.  ``head_schedule`` (Triton fused head): ``recompute`` (statistics pass, then recompute the
    kept tokens' logits: 8 NHV/tp flops, no fp32 V x H buffer) or ``single`` (one pass: 6 NHV/tp flops and
    an fp32 dW accumulator; per-token rules only, the others keep ``recompute``).  ``head_matmul`` (Triton
    fused head): ``triton`` (logits only in registers) or ``cublas`` (cuBLAS writes an fp32 logits chunk).
    ``triton_tiles``: ``(block_n, block_v, block_k, num_warps, num_stages, splits)`` of the Triton head
    kernels on the GPU, or ``None`` for the defaults (the CPU interpreter always uses its own small tiles).
    """

    kernel: str = "auto"
    head_schedule: str = "recompute"
    head_matmul: str = "triton"
    triton_tiles: tuple[int, ...] | None = None

    def __post_init__(self):
        for key, allowed in (("kernel", KERNELS), ("head_schedule", HEAD_SCHEDULES), ("head_matmul", HEAD_MATMULS)):
            value = getattr(self, key)
            if value not in allowed:
                raise KernelOptionError(key, value, ", ".join(allowed))
        object.__setattr__(self, "triton_tiles", parse_tiles(self.triton_tiles))

    @classmethod
    def from_env(cls, defaults: KernelOptions | None = None, environ: Mapping[str, str] | None = None) -> KernelOptions:
        """``defaults`` (the config's choices; ``None``: the built-in defaults) with every option whose
        ``RECALL_DIST_*`` variable is set (non-empty) in ``environ`` (``os.environ``) replaced by its value;
        a bad value raises ``KernelOptionError`` naming the variable."""
        base = defaults if defaults is not None else cls()
        env = os.environ if environ is None else environ
        changes = {}
        for key, name in ENV.items():
            raw = env.get(name, "")
            if not raw.strip():
                continue
            if key == "triton_tiles":
                changes[key] = parse_tiles(raw, key, name)
                continue
            try:
                replace(base, **{key: raw.strip()})
            except KernelOptionError as e:
                raise KernelOptionError(key, raw, e.allowed, name) from None
            changes[key] = raw.strip()
        return replace(base, **changes) if changes else base

    @classmethod
    def resolve(cls, kernel: str | KernelOptions | None) -> KernelOptions:
        """The options of a ``fused_linear_loss`` / ``vocab_parallel_loss`` call from its ``kernel=``
        argument: a ``KernelOptions`` is used as given (the caller merged the environment once, at its start);
        a string picks the kernel (over ``$RECALL_DIST_KERNEL``) and leaves the other options to their
        environment variables; ``None`` takes everything from the environment, else the defaults."""
        if isinstance(kernel, KernelOptions):
            return kernel
        if kernel is None:
            return cls.from_env()
        environ = {k: v for k, v in os.environ.items() if k != ENV["kernel"]}
        return cls.from_env(cls(kernel=kernel), environ)
