"""Model construction: Llama-2 7B/13B and OLMo-1B configs on the meta device with the published
parameter counts, an FSDP2 sharding plan covering every parameter, ``recall-dist plan`` on them,
and the hub-loading path on a locally saved tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from recall_dist.train import memory_plan as plan_cli
from recall_dist.train.backends.fsdp2 import sharding_plan
from recall_dist.train.config import load_train_config
from recall_dist.train.models import build_model, count_parameters, resolve_attn_implementation
from recall_dist.train.resources import validate_resources


def _closed_form_llama(vocab, hidden, inter, layers) -> int:
    """Embeddings + untied head + per layer (q,k,v,o + gate,up,down + 2 norms) + final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden


@pytest.mark.parametrize(
    "preset,billions,closed_form",
    [
        ("llama2-7b", 6.74, _closed_form_llama(32000, 4096, 11008, 32)),
        ("llama2-13b", 13.0, _closed_form_llama(32000, 5120, 13824, 40)),
        ("olmo-1b", 1.18, None),
    ],
)
def test_meta_model_parameter_count_and_sharding_plan(preset, billions, closed_form):
    cfg = load_train_config("configs/cdiv.yaml", [f"model={preset}"])
    model = build_model(cfg.model, meta=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    n = count_parameters(model)
    assert n / 1e9 == pytest.approx(billions, abs=0.02)  # published: 6.74B, 13.0B, 1.18B
    if closed_form is not None:
        assert n == closed_form
    units = sharding_plan(model)
    names = [name for names in units.values() for name in names]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())  # each exactly once
    assert len(units) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize(
    "argv,verdict",
    [
        (["configs/cdiv.yaml", "--nodes", "1", "--gpus-per-node", "8"], True),
        (["configs/cdiv.yaml", "model=llama2-13b", "backend.name=fsdp2", "--nodes", "2", "--gpus-per-node", "8"], True),
        (
            [
                "configs/nll.yaml",
                "model=llama2-13b",
                "backend.zero_stage=2",
                "backend.bf16=false",
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
            ],
            False,
        ),
    ],
)
def test_plan_runs_on_7b_13b(capsys, argv, verdict):
    assert plan_cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is verdict
    assert out["total_gib"] == pytest.approx(sum(out["rows_gib"].values()))
    assert plan_cli.main(argv) == 0
    assert ("verdict: FITS" if verdict else "verdict: DOES NOT FIT") in capsys.readouterr().out


def test_zero3_model_states_match_closed_form():
    """bf16 ZeRO-3 on 8 GPUs: 2 + 2 + 12 bytes per parameter, each divided by 8 (ZeRO paper)."""
    cfg = load_train_config("configs/cdiv.yaml")
    result = plan_cli.make_plan(cfg, 1, 8)
    n = result.total_params
    assert result.rows["parameters"] == pytest.approx(2 * n / 8)
    assert result.rows["gradients"] == pytest.approx(2 * n / 8)
    assert result.rows["optimizer states (master + Adam m, v)"] == pytest.approx(12 * n / 8)


def test_attention_choice_on_cpu_is_sdpa():
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"


def test_local_pretrained_directory_round_trip(tmp_path):
    tiny = load_train_config("configs/tiny_cpu.yaml")
    torch.manual_seed(0)
    model = build_model(tiny.model)
    model.save_pretrained(tmp_path / "tiny")
    from recall_dist.data import load_tokenizer

    load_tokenizer("char:product").save_pretrained(tmp_path / "tiny")
    cfg = load_train_config("configs/tiny_cpu.yaml", [f"model={{name_or_path: {tmp_path / 'tiny'}}}"])
    assert len(validate_resources(cfg)) == 13
    loaded = build_model(cfg.model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=False):
        torch.testing.assert_close(a, b, msg=name)


class _LiveTensorBytes:
    """Peak bytes of the tensors created while active (a TorchDispatchMode sees every aten op's
    outputs; a storage counts from its first tensor until its last one is garbage): what an allocator
    without caching would hold, independent of the host allocator.  Storages of ``inputs`` are the
    caller's and do not count."""

    def __init__(self, *inputs: torch.Tensor):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.peak = self.current = 0
        refs: dict[int, int] = {}
        sizes: dict[int, int] = {}
        external = {t.untyped_storage().data_ptr() for t in inputs}
        tracker = self

        def release(key: int) -> None:
            refs[key] -= 1
            if refs[key] == 0:
                tracker.current -= sizes.pop(key)
                del refs[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    key = t.untyped_storage().data_ptr()
                    if key == 0 or key in external:
                        continue
                    if key not in refs:
                        refs[key], sizes[key] = 0, t.untyped_storage().nbytes()
                        tracker.current += sizes[key]
                        tracker.peak = max(tracker.peak, tracker.current)
                    refs[key] += 1
                    weakref.finalize(t, release, key)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize(
    "loss,tokens,hidden,vocab,chunk",
    [  # single-pass (cdiv) and two-pass (truncr) schedules; default and explicit chunk sizes
        ("cdiv", 4096, 256, 8192, None),
        ("cdiv", 2048, 512, 32000, None),
        ("truncr", 2048, 512, 32000, None),
        ("cdiv", 4096, 128, 16000, 1024),
    ],
)
def test_plan_head_row_is_the_heads_measured_peak(loss, tokens, hidden, vocab, chunk):
    """`recall-dist plan`'s loss-head row (train/memory_plan.py::head_bytes, chunk from the head's own
    chunk_rows) vs the peak of the tensors the fused head creates in forward + backward (fp32, where
    the CPU and CUDA PyTorch paths allocate alike): within 10%.  (Before the head dropped each chunk
    before computing the next, two chunks were alive: 1.33x the plan at V=32000.)"""
    from recall_dist import build_loss, fused_linear_loss
    from recall_dist.train.memory_plan import head_bytes

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=g)).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=g)
    with _LiveTensorBytes(h, w, target) as live:
        fused_linear_loss(h, w, target, build_loss(loss), chunk_size=chunk).loss.backward()
    planned = head_bytes(tokens, hidden, vocab, chunk, bf16=False)
    print(
        f"{loss} N={tokens} H={hidden} V={vocab}: measured {live.peak / 2**20:.1f} MiB, plan {planned / 2**20:.1f} MiB"
    )
    assert planned <= live.peak <= 1.1 * planned, (live.peak, planned)
