"""One optimizer step = one weighted NLL, however the batch is split: 1 process x 1 micro-batch of 8,
1 process x 4 micro-batches of 2, and 2 processes x 2 micro-batches of 2 give the same step gradient, the
same gradient norm, the same update and the same step statistics -- on ZeRO-2, ZeRO-3 and FSDP2, for nll
and c-Div with both normalisations, from a model whose c-Div weights vary a lot (not a random init, where
every q is near 1/V and the weights are all alike).  Each split is the others' reference: a second layout
of the same computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recall_dist.distributed.testing import run_distributed_test
from tests.train.helpers import build, tiny_config_dict
from tests.train.test_scale import write_pretrained

BACKENDS = {
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "fsdp2": {"name": "fsdp2"},
}
LOSSES = {
    "nll-weights": {"name": "nll", "params": {}},
    "nll-tokens": {"name": "nll", "params": {"normalize": "tokens"}},
    "cdiv-weights": {"name": "cdiv", "params": {"alpha": 2.0}},
    "cdiv-tokens": {"name": "cdiv", "params": {"alpha": 2.0, "normalize": "tokens"}},
}
SPLITS = {"1x8": (1, 8), "1x4x2": (1, 2), "2x2x2": (2, 2)}  # (processes, micro-batch size); 8 per step
STATS = ("loss", "nll", "ess", "weight_mean", "weight_max", "kept_fraction", "tokens")

pytestmark = pytest.mark.slow


def _config(pretrained: str, backend: str, loss: str, micro: int) -> dict:
    return tiny_config_dict(
        "unused",
        model={"name_or_path": pretrained, "attn_implementation": "sdpa"},
        backend=BACKENDS[backend],
        loss=LOSSES[loss],
        # eps >> |gradient|: Adam's first update is then ~ lr * g / eps, linear in the gradient, so the
        # updated weights also show whether the exact normaliser reached the optimizer.
        optim={"lr": 1e-2, "eps": 1.0, "grad_clip": 0.0},
        train={"micro_batch_size": micro, "global_batch_size": 8, "seed": 3},
    )


def _split_worker(pretrained: str, splits: list[str], result_dir: str) -> None:
    import torch.distributed as dist

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step

    ctx = init_distributed()
    for split in splits:
        for backend in BACKENDS:
            for loss in LOSSES:
                cfg = build(_config(pretrained, backend, loss, SPLITS[split][1]))
                run = setup(cfg, validate_resources(cfg), ctx)
                seen = {}

                def capture(grad_scale, stats, run=run, seen=seen):
                    seen["grads"] = {k: v * grad_scale for k, v in run.engine.full_gradients().items()}

                stats = train_step(run, endless(run.batches), before_update=capture)
                params = dict(run.engine.full_parameters())
                if dist.get_rank() == 0:
                    out = {"grads": seen["grads"], "stats": stats, "params": params, "accum": run.accumulation_steps}
                    torch.save(out, Path(result_dir, f"{split}-{backend}-{loss}.pt"))
                del run
    dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accumulation")
    # A "trained-looking" model: weights 25x the usual init, so q ranges from ~0 to ~1 and c-Div (alpha 2,
    # w = 1/q) weights span orders of magnitude.
    pretrained = write_pretrained(root / "pretrained", seed=11, initializer_range=0.5)
    run_distributed_test(_split_worker, 1, str(pretrained), ["1x8", "1x4x2"], str(root), timeout=1800)
    run_distributed_test(_split_worker, 2, str(pretrained), ["2x2x2"], str(root), timeout=1800)
    return root


def _load(results: Path, split: str, backend: str, loss: str) -> dict:
    return torch.load(results / f"{split}-{backend}-{loss}.pt")


def _assert_close(got: torch.Tensor, ref: torch.Tensor, where: str) -> None:
    """Equal up to float32 summation order.  c-Div weights span orders of magnitude, so a gradient
    entry is a sum of large terms that cancel: its rounding error scales with the tensor's largest
    entries, not with the entry itself.  The tolerance is relative to the tensor's max |entry| (measured:
    up to 5e-7 between splits, 1.4e-6 between backends); a wrong normaliser (what this file guards
    against) is off by tens of percent."""
    scale = ref.abs().max().item()
    print(f"{where}: max |diff| / max |ref| = {(got - ref).abs().max().item() / max(scale, 1e-30):.2e}")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{where}: {m}")


def test_the_weights_really_vary(results):
    stats = _load(results, "1x8", "fsdp2", "cdiv-weights")["stats"]
    print(f"c-Div weights on the 8-sequence step: {stats}")
    # ESS (sum w)^2 / sum w^2 well below the token count: a few tokens carry most of the weight.
    assert stats["weight_max"] > 5 * stats["weight_mean"] and stats["ess"] < 0.25 * stats["tokens"], stats


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_split_gives_the_same_step(results, backend, loss):
    ref = _load(results, "1x8", backend, loss)
    assert ref["accum"] == 1
    for split in ("1x4x2", "2x2x2"):
        got = _load(results, split, backend, loss)
        assert got["accum"] == (4 if split == "1x4x2" else 2)
        where = f"{split} {backend} {loss}"
        for name, g in ref["grads"].items():
            _assert_close(got["grads"][name], g, f"{where} grad {name}")
        assert got["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=1e-5), where
        for key in STATS:
            assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-6), (where, key)
        for name, p in ref["params"].items():
            _assert_close(got["params"][name], p, f"{where} param {name}")


def test_backends_agree(results):
    """The three backends' 1 x 8 steps are the same computation too."""
    ref = _load(results, "1x8", "fsdp2", "cdiv-weights")
    for backend in ("zero2", "zero3"):
        got = _load(results, "1x8", backend, "cdiv-weights")
        assert got["stats"]["grad_norm"] == pytest.approx(ref["stats"]["grad_norm"], rel=1e-5), backend
        for name, g in ref["grads"].items():
            _assert_close(got["grads"][name], g, f"{backend} grad {name}")
