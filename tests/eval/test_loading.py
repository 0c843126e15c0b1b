"""The sweep's compute dtype (``eval/loading.compute_dtype``): ``bfloat16_if_native`` follows the CPU's
flags as the trainer's ``backend.bf16: auto`` does, and ``load_model`` loads a real saved model in it."""

import pytest
import torch

from recall_dist.data import CharTokenizer
from recall_dist.eval.config import ModelSpec
from recall_dist.eval.loading import compute_dtype, load_model
from tests.eval.models import random_llama, save

# /proc/cpuinfo excerpts: a Sapphire Rapids core (AMX), a Cooper Lake core (AVX512_BF16), a Zen 3 core (neither)
AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma vaes\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [(AMX, torch.bfloat16), (AVX512_BF16, torch.bfloat16), (ZEN3, torch.float32), ("", torch.float32)],
)
def test_bfloat16_if_native_follows_the_cpu_flags(cpuinfo, expected):
    assert compute_dtype("bfloat16_if_native", "cpu", cpuinfo) is expected


@pytest.mark.parametrize("cpuinfo", [AMX, ZEN3])
def test_the_other_dtypes_do_not_look_at_the_cpu(cpuinfo):
    assert compute_dtype("auto", "cpu", cpuinfo) is torch.float32  # the saved dtype only on a GPU
    assert compute_dtype("float32", "cpu", cpuinfo) is torch.float32
    assert compute_dtype("bfloat16", "cpu", cpuinfo) is torch.bfloat16


def test_load_model_uses_the_resolved_dtype(tmp_path, monkeypatch):
    """A saved float32 model loads in bfloat16 on a CPU reported with AMX and in float32 on one without."""
    import recall_dist.train.precision as precision

    tokenizer = CharTokenizer("0123456789")
    path = save(random_llama(tokenizer.vocab_size, seed=0), tokenizer, tmp_path / "model")
    spec = ModelSpec(name="m", path=str(path))
    for cpuinfo, expected in ((AMX, torch.bfloat16), (ZEN3, torch.float32)):
        monkeypatch.setattr(precision, "read_cpuinfo", lambda text=cpuinfo: text)
        model, _ = load_model(spec, tmp_path / "cache", "fp", "bfloat16_if_native")
        assert {p.dtype for p in model.parameters()} == {expected}
