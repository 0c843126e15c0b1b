"""``backend.bf16: auto`` (``train/precision.py``): the CPU's native bf16 read from given ``/proc/cpuinfo``
texts, the resolution of true / false / auto, the config key, and the trainer's set-up replacing ``auto`` by
its answer (logged).  A real run records the answer in its saved config: tests/e2e/test_nothing_lost.py."""

from __future__ import annotations

import pytest
import torch

from recall_dist.configtree import ConfigError
from recall_dist.distributed.process_group import DistContext
from recall_dist.train.precision import (
    AUTO,
    cpu_flags,
    cpu_native_bf16,
    native_bf16,
    read_cpuinfo,
    resolve_bf16,
    resolve_compute_bf16,
)
from tests.train.helpers import build, tiny_config_dict

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8
"""
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes sha2 crc32 atomics bf16\n"


def test_cpu_flags_reads_every_core_and_arm_features():
    assert {"amx_bf16", "amx_tile", "avx512f"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert "bf16" in cpu_flags(GRAVITON) and "model" not in cpu_flags(SAPPHIRE_RAPIDS)
    assert cpu_flags("") == set()


@pytest.mark.parametrize(
    "cpuinfo,native,why",
    [
        (SAPPHIRE_RAPIDS, True, "amx_bf16, amx_tile"),
        (ZEN4, True, "avx512_bf16"),
        (SKYLAKE, False, "none of avx512_bf16, amx_bf16, amx_tile"),
        (GRAVITON, False, "none of"),  # Arm's bf16 flag is not one this rule knows: fp32, the safe side
        (None, False, "not Linux"),
    ],
    ids=["amx", "avx512_bf16", "avx512-without-bf16", "arm", "no-cpuinfo"],
)
def test_cpu_native_bf16_from_a_given_cpuinfo(cpuinfo, native, why):
    got, reason = cpu_native_bf16(cpuinfo)
    assert got is native and why in reason


def test_read_cpuinfo_of_a_missing_file_is_none(tmp_path):
    assert read_cpuinfo(tmp_path / "cpuinfo") is None
    (tmp_path / "cpuinfo").write_text(ZEN4)
    assert read_cpuinfo(tmp_path / "cpuinfo") == ZEN4


@pytest.mark.parametrize("setting", [True, False])
def test_true_and_false_are_kept_whatever_the_hardware(setting):
    assert resolve_bf16(setting, "cpu", SKYLAKE)[0] is setting
    assert resolve_bf16(setting, "cpu", ZEN4)[0] is setting


def test_auto_follows_the_cpu():
    assert resolve_bf16(AUTO, "cpu", ZEN4) == (True, "the CPU has avx512_bf16")
    assert resolve_bf16(AUTO, torch.device("cpu"), SKYLAKE)[0] is False
    assert native_bf16("meta")[0] is False  # a device without a check: fp32
    with pytest.raises(ValueError, match=r"backend.bf16: 'yes please' is not allowed; allowed: true, false, auto"):
        resolve_bf16("yes please", "cpu", ZEN4)


def test_the_config_key_accepts_auto_and_names_a_bad_value(tmp_path):
    assert build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": "auto"})).backend.bf16 == AUTO
    assert build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": None})).backend.bf16 is False
    with pytest.raises(ConfigError, match=r"backend.bf16: 'fast' matches none of"):
        build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": "fast"}))


def test_setup_replaces_auto_by_this_machines_answer_and_logs_it(tmp_path, capsys):
    cfg = build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": "auto"}))
    ctx = DistContext(0, 1, 0, torch.device("cpu"), created_group=False)
    expected, why = native_bf16("cpu")
    assert resolve_compute_bf16(cfg, ctx) is expected and cfg.backend.bf16 is expected
    assert f"backend.bf16=auto: {'bf16' if expected else 'fp32'} compute ({why})" in capsys.readouterr().err
    assert resolve_compute_bf16(cfg, ctx) is expected  # already resolved: kept, not logged again
    assert capsys.readouterr().err == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_on_a_gpu_follows_torch():
    assert resolve_bf16(AUTO, "cuda")[0] is torch.cuda.is_bf16_supported(including_emulation=False)


def test_the_memory_plan_of_auto_assumes_bf16_gpus_and_asks_this_cpu_for_cpu_ranks(tmp_path):
    from recall_dist.train.memory_plan import make_plan

    gpu = build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": "auto"}))
    fp32 = build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": False}))
    assert make_plan(gpu, 1, 2).total_bytes < make_plan(fp32, 1, 2).total_bytes and gpu.backend.bf16 is True
    cpu = build(tiny_config_dict(tmp_path, backend={"name": "fsdp2", "bf16": "auto"}))
    make_plan(cpu, 1, 2, device="cpu")
    assert cpu.backend.bf16 is native_bf16("cpu")[0]
