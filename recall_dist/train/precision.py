"""``backend.bf16: auto``: compute in bf16 only where the hardware does bf16 natively, decided once at start.

Emulated bf16 is slower than fp32: on a CPU without AVX512_BF16 or AMX a bf16 fine-tuning step was
measured about 2x slower than the same step in fp32.  So ``auto`` picks bf16 on

- CUDA: when ``torch.cuda.is_bf16_supported()`` (Ampere and later);
- CPU: when ``/proc/cpuinfo`` lists ``avx512_bf16`` or an AMX flag (``amx_bf16``, ``amx_tile``, ...);
  elsewhere than Linux (no ``/proc/cpuinfo``) it answers no.

``resolve_compute_bf16`` runs in the trainer's set-up: rank 0 decides, every rank takes its answer (ranks
computing in different dtypes would not match), the log says which was picked and why, and
``cfg.backend.bf16`` holds the answer from then on, so the run's saved config says what ran.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recall_dist.distributed.ranks import on_rank0
from recall_dist.log import get_logger

AUTO = "auto"
CPUINFO = Path("/proc/cpuinfo")
# Flags Linux reports for native bf16 arithmetic: AVX512_BF16 (Cooper Lake, Zen 4) and AMX (Sapphire Rapids).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")

log = get_logger("train")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of a ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``), all cores together."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def read_cpuinfo(path: Path = CPUINFO) -> str | None:
    """The text of ``path`` (``/proc/cpuinfo``), None where there is none (not Linux) or it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def cpu_native_bf16(cpuinfo: str | None) -> tuple[bool, str]:
    """(native bf16?, why) for a CPU described by ``cpuinfo`` (None: no ``/proc/cpuinfo``)."""
    if cpuinfo is None:
        return False, "no /proc/cpuinfo (not Linux): native bf16 unknown, fp32 compute"
    found = sorted(cpu_flags(cpuinfo) & set(NATIVE_BF16_FLAGS))
    if found:
        return True, f"the CPU has {', '.join(found)}"
    return False, f"the CPU has none of {', '.join(NATIVE_BF16_FLAGS)} (bf16 would be emulated, slower than fp32)"


def cuda_native_bf16() -> tuple[bool, str]:
    """(native bf16?, why) for the current CUDA device."""
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"{name} supports bf16"
    return False, f"{name} has no native bf16 (torch.cuda.is_bf16_supported() is false)"


def native_bf16(device: torch.device | str, cpuinfo: str | None = None) -> tuple[bool, str]:
    """(native bf16?, why) on ``device``; a CPU is judged by ``cpuinfo`` (default: read ``/proc/cpuinfo``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_native_bf16()
    if device.type == "cpu":
        return cpu_native_bf16(read_cpuinfo() if cpuinfo is None else cpuinfo)
    return False, f"no native-bf16 check for {device.type} devices: fp32 compute"


def resolve_bf16(setting: bool | str, device: torch.device | str, cpuinfo: str | None = None) -> tuple[bool, str]:
    """The compute dtype ``backend.bf16 = setting`` means on ``device``: (bf16?, why).  ``True``/``False``
    are kept as given; ``"auto"`` asks ``native_bf16``."""
    if setting == AUTO:
        return native_bf16(device, cpuinfo)
    if isinstance(setting, bool):
        return setting, "set by backend.bf16"
    raise ValueError(f"backend.bf16: {setting!r} is not allowed; allowed: true, false, auto, null")


def resolve_compute_bf16(cfg, ctx) -> bool:
    """Collective over ``ctx.dp_group``: replace ``cfg.backend.bf16 = auto`` by rank 0's answer on every
    rank, logged on rank 0; a true/false setting is left as it is.  Returns the compute choice."""
    if cfg.backend.bf16 != AUTO:
        return cfg.backend.bf16
    bf16, why = on_rank0(lambda: resolve_bf16(AUTO, ctx.device), ctx.dp_group)
    if ctx.rank == 0:
        log.info("backend.bf16=auto: %s compute (%s)", "bf16" if bf16 else "fp32", why)
    cfg.backend.bf16 = bf16
    return bf16
