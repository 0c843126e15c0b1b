"""The Triton path (recall_dist/parallel/triton_head.py) against the fp64 reference and the PyTorch path.

Without CUDA the kernels run through Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with CUDA the same checks run compiled, and
``test_gpu.py`` adds GPU-sized cases.  The ``check_*`` functions take the device and are shared with
``test_gpu.py``.
"""

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("triton")

from recall_dist import build_loss, fused_linear_loss, vocab_parallel_loss
from recall_dist.distributed.collectives import all_reduce_, group_rank
from recall_dist.distributed.testing import run_distributed_test, tp_dp_groups
from recall_dist.parallel import triton_head, triton_ops
from recall_dist.parallel.options import KernelOptions
from recall_dist.parallel.triton_kernels import INTERPRET
from tests.parallel.cases import RULE_CASES, case_id
from tests.reference import NaiveTruncState, naive_loss

DEVICE = "cpu" if INTERPRET else "cuda"
B, T, H, V, PAD = 4, 9, 16, 40, 5  # 36 tokens, 40 real columns + 5 padded rows: crosses every tile edge


def make(dtype, seed=0, b=B, t=T, hdim=H, vocab=V, pad=PAD, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, hdim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab + pad, hdim, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, vocab, (b, t), generator=g)
    target[0, :3] = -100
    target[b // 2, t // 2 :] = -100
    return hidden.to(dtype), weight.to(dtype), target


def reference(hidden, weight, target, name, params, vocab_size):
    """fp64 value and gradients of the naive loss on the (rounded) inputs."""
    h = hidden.double().detach().requires_grad_()
    w = weight.double().detach().requires_grad_()
    seq = torch.arange(target.shape[0]).unsqueeze(1).expand_as(target).reshape(-1)
    ref = naive_loss(
        (h @ w.t()).reshape(-1, w.shape[0]),
        target.reshape(-1),
        name,
        params,
        vocab_size=vocab_size,
        seq_ids=seq,
        state=NaiveTruncState(params.get("buffer_size", 10**6)),
    )
    gh, gw = torch.autograd.grad(ref, (h, w))
    return ref.detach(), gh, gw


def run(entry, kernel, hidden, weight, target, loss, device, **kw):
    """Loss output and fp64 CPU gradients w.r.t. hidden and weight, through ``entry``."""
    h = hidden.to(device).detach().requires_grad_()  # detach: never flag the caller's tensor
    w = weight.to(device).detach().requires_grad_()
    if entry == "fused":
        out = fused_linear_loss(h, w, target.to(device), loss, kernel=kernel, **kw)
        gh, gw = torch.autograd.grad(out.loss, (h, w))
    else:
        logits = (h @ w.t()).detach().requires_grad_()
        out = vocab_parallel_loss(logits, target.to(device), loss, kernel=kernel, **kw)
        (gl,) = torch.autograd.grad(out.loss, logits)
        gh, gw = torch.autograd.grad(h @ w.t(), (h, w), gl)
    return out, gh.double().cpu(), gw.double().cpu()


def close(a, b, tol):
    """Max abs difference within ``tol`` of the reference's scale."""
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-30)


def check_against_reference(entry, case, dtype, device, tol, chunk_size=None, **shape):
    name, params = case
    hidden, weight, target = make(dtype, **shape)
    vocab = shape.get("vocab", V)
    ref, rgh, rgw = reference(hidden, weight, target, name, params, vocab)
    loss = build_loss(name, **params)
    out, gh, gw = run(entry, "triton", hidden, weight, target, loss, device, vocab_size=vocab, chunk_size=chunk_size)
    assert out.loss.dtype == torch.float32 and gh.shape == rgh.shape
    assert out.stats["loss"] == pytest.approx(float(ref), rel=tol), (out.stats["loss"], float(ref))
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=tol)
    assert close(gh, rgh, tol) and close(gw, rgw, tol)
    assert gw[vocab:].abs().max() == 0  # padded vocabulary rows
    return out


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_fp32_matches_fp64_reference(entry, case):
    check_against_reference(entry, case, torch.float32, DEVICE, 2e-5)


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", RULE_CASES[:5], ids=case_id)
def test_low_precision_matches_fp64_reference(entry, dtype, case):
    check_against_reference(entry, case, dtype, DEVICE, 2e-2)


@pytest.mark.parametrize("case", [RULE_CASES[1], RULE_CASES[4], RULE_CASES[6]], ids=case_id)
def test_cublas_matmul_engine_matches_fp64_reference(case, monkeypatch):
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", "cublas")
    check_against_reference("fused", case, torch.float32, DEVICE, 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_id)
def test_single_pass_schedule_matches_fp64_reference(case, dtype, monkeypatch):
    """Per-token rules take the single pass; the others (truncation, nll_mix) fall back to recompute."""
    monkeypatch.setenv("RECALL_DIST_HEAD_SCHEDULE", "single")
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    check_against_reference("fused", case, dtype, DEVICE, tol, chunk_size=7)  # 5 token chunks


@pytest.mark.parametrize("engine", ["triton", "cublas"])
@pytest.mark.parametrize("entry", ["fused", "logits"])
def test_same_as_pytorch_path(entry, engine, monkeypatch):
    """Triton and PyTorch paths, same fp32 inputs: statistics and gradients agree to fp32 rounding."""
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", engine)
    hidden, weight, target = make(torch.float32, seed=3)
    loss = lambda: build_loss("cdiv", alpha=1.4)  # noqa: E731
    a, agh, agw = run(entry, "triton", hidden, weight, target, loss(), DEVICE, vocab_size=V, chunk_size=5)
    b, bgh, bgw = run(entry, "torch", hidden, weight, target, loss(), DEVICE, vocab_size=V, chunk_size=5)
    for key in ("loss", "nll", "weight_mean", "weight_max", "ess", "kept_fraction", "tokens", "divergence"):
        assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-5), key
    assert close(agh, bgh, 1e-5) and close(agw, bgw, 1e-5)


def check_tp2_emulation(dtype, device, tol, engine="triton", **shape):
    """Weight split into two vocabulary shards (the second padded): per-shard statistics reduced by
    hand equal the unsplit ones, and shard gradients (global lse, coefficients) rebuild the unsplit ones."""
    hidden, weight, target = make(dtype, **shape)
    h, w = hidden.reshape(-1, hidden.shape[-1]).to(device), weight.to(device)
    vocab = shape.get("vocab", V)
    rows = (target.reshape(-1) != -100).nonzero().squeeze(1).to(device)
    y = target.reshape(-1)[rows.cpu()].to(device)
    half = -(-w.shape[0] // 2)
    shards = [(w[:half], 0, min(half, vocab)), (w[half:], half, vocab - half)]
    parts = []
    for shard, start, n_cols in shards:
        local = torch.where((y >= start) & (y < start + n_cols), y - start, -1)
        parts.append((triton_ops.head_statistics(h, shard, rows, local, n_cols, engine=engine), local, n_cols))
    m0, s0, z0 = parts[0][0]
    m1, s1, z1 = parts[1][0]
    m = torch.maximum(m0, m1)
    lse = m + torch.log(s0 * torch.exp(m0 - m) + s1 * torch.exp(m1 - m))
    mu, su, zu = triton_ops.head_statistics(h, w, rows, y, vocab, engine=engine)
    exact = torch.logsumexp(h[rows].double() @ w[:vocab].double().t(), dim=1)
    assert close(lse.double().cpu(), exact.cpu(), tol) and close((mu + torch.log(su)).double().cpu(), exact.cpu(), tol)
    assert close((z0 + z1).cpu(), zu.cpu(), 1e-6)  # the target logit comes from exactly one shard
    coef = torch.rand(rows.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    coef[::4] = 0.0  # tokens a truncation rule dropped
    kw = {"need_h": True, "need_w": True, "chunk_size": 3, "engine": engine}
    grads = [
        triton_ops.head_gradients(h, shard, rows, local, lse, coef, n_cols, **kw)
        for (shard, _, n_cols), (_, local, _) in zip(shards, parts, strict=True)
    ]
    gh, gw = triton_ops.head_gradients(h, w, rows, y, lse, coef, vocab, **kw)
    assert close((grads[0][0].double() + grads[1][0].double()).cpu(), gh.double().cpu(), tol)
    assert close(torch.cat([grads[0][1], grads[1][1]]).double().cpu(), gw.double().cpu(), tol)
    # and the unsplit gradients are those of sum_n coef_n nll_n in fp64
    h64, w64 = h.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    nll = torch.nn.functional.cross_entropy((h64[rows.cpu()] @ w64[:vocab].t()), y.cpu(), reduction="none")
    rgh, rgw = torch.autograd.grad((coef.cpu() * nll).sum(), (h64, w64))
    assert close(gh.double().cpu(), rgh, tol) and close(gw.double().cpu(), rgw, tol)


@pytest.mark.parametrize("engine", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tp2_emulation_equals_unsplit(dtype, engine):
    check_tp2_emulation(dtype, DEVICE, 2e-5 if dtype == torch.float32 else 2e-2, engine=engine)


def test_logits_statistics_of_two_shards():
    hidden, weight, target = make(torch.float32)
    x = (hidden.reshape(-1, H) @ weight.t()).to(DEVICE)
    rows = torch.arange(x.shape[0], device=DEVICE)
    y = target.reshape(-1).clamp_min(0).to(DEVICE)
    a = triton_ops.logits_statistics(x[:, :20], rows, torch.where(y < 20, y, -1), 20)
    b = triton_ops.logits_statistics(x[:, 20:], rows, torch.where(y >= 20, y - 20, -1), V - 20)
    m = torch.maximum(a[0], b[0])
    lse = m + torch.log(a[1] * torch.exp(a[0] - m) + b[1] * torch.exp(b[0] - m))
    assert torch.allclose(lse.cpu(), torch.logsumexp(x[:, :V].cpu(), dim=1), rtol=1e-6)
    assert torch.equal((a[2] + b[2]).cpu(), x.cpu().gather(1, y.cpu().unsqueeze(1)).squeeze(1))


def test_shard_of_padding_only():
    hidden, weight, _ = make(torch.float32)
    h, rows = hidden.reshape(-1, H).to(DEVICE), torch.arange(5, device=DEVICE)
    m, s, zt = triton_ops.head_statistics(h, weight.to(DEVICE), rows, torch.full((5,), -1, device=DEVICE), 0)
    assert torch.isneginf(m).all() and (s == 0).all() and (zt == 0).all()


@pytest.mark.parametrize("entry", ["fused", "logits"])
@pytest.mark.parametrize("name", ["cdiv", "truncr"])
def test_all_ignored_batch_gives_zero_loss_and_zero_grads(entry, name):
    hidden, weight, target = make(torch.float32)
    target[:] = -100
    loss = build_loss(name, **({"min_count": 1} if name == "truncr" else {}))
    out, gh, gw = run(entry, "triton", hidden, weight, target, loss, DEVICE)
    assert float(out.loss.detach()) == 0.0 and out.stats["tokens"] == 0
    assert gh.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.parametrize("schedule", ["recompute", "single"])
def test_non_finite_token_skips_the_step(schedule, monkeypatch):
    monkeypatch.setenv("RECALL_DIST_HEAD_SCHEDULE", schedule)
    hidden, weight, target = make(torch.float32)
    hidden[1, 3] = float("nan")  # a whole row of NaN logits, target valid
    out, gh, gw = run("fused", "triton", hidden, weight, target, build_loss("cdiv"), DEVICE)
    assert out.stats["nonfinite_tokens"] == 1 and float(out.loss.detach()) == 0.0
    assert torch.isfinite(gh).all() and gh.abs().max() == 0 and gw.abs().max() == 0
    logits = (make(torch.float32)[0] @ weight.t()).to(DEVICE).requires_grad_()
    with torch.no_grad():
        logits[2, 1, 5] = float("inf")
    out = vocab_parallel_loss(logits, target.to(DEVICE), build_loss("truncr", min_count=1), kernel="triton")
    out.loss.backward()
    assert out.stats["nonfinite_tokens"] == 1 and float(out.loss.detach()) == 0.0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_gradient_accumulation_scale_and_no_grad():
    hidden, weight, target = make(torch.float32)
    h = hidden.to(DEVICE).requires_grad_()
    w = weight.to(DEVICE)
    out = fused_linear_loss(h, w, target.to(DEVICE), build_loss("cdiv"), kernel="triton")
    (0.25 * out.loss).backward()
    ref, rgh, _ = reference(hidden, weight, target, "cdiv", {"alpha": 1.4}, None)
    assert close(h.grad.double().cpu(), 0.25 * rgh, 2e-5)
    with torch.no_grad():
        value = fused_linear_loss(hidden.to(DEVICE), w, target.to(DEVICE), build_loss("cdiv"), kernel="triton").loss
    assert float(value) == pytest.approx(float(ref), rel=2e-5)


def test_dispatch_choices(monkeypatch):
    cpu = torch.zeros(2)
    assert not triton_head.use_triton(cpu)  # auto: CPU tensors take the PyTorch path
    assert not triton_head.use_triton(cpu, "torch")
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        triton_head.use_triton(cpu, "cuda")
    monkeypatch.setenv("RECALL_DIST_KERNEL", "fast")  # read where a call resolves its options, never by use_triton
    assert not triton_head.use_triton(cpu)
    with pytest.raises(ValueError, match="RECALL_DIST_KERNEL='fast'"):
        KernelOptions.resolve(None)
    assert KernelOptions.resolve("torch").kernel == "torch"  # an explicit kernel= name beats the variable
    monkeypatch.setenv("RECALL_DIST_KERNEL", "torch")
    assert not triton_head.use_triton(cpu.to(DEVICE), KernelOptions.resolve(None).kernel)
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", "cutlass")
    with pytest.raises(ValueError, match="RECALL_DIST_HEAD_MATMUL='cutlass' is not allowed; allowed: triton, cublas"):
        KernelOptions.from_env()
    monkeypatch.setenv("RECALL_DIST_HEAD_MATMUL", "cublas")
    monkeypatch.setenv("RECALL_DIST_HEAD_SCHEDULE", "twice")
    with pytest.raises(
        ValueError, match="RECALL_DIST_HEAD_SCHEDULE='twice' is not allowed; allowed: recompute, single"
    ):
        KernelOptions.from_env()
    with pytest.raises(ValueError, match="bf16, fp16 and fp32"):
        triton_head.use_triton(cpu.double(), "triton")
    if INTERPRET:
        assert triton_head.use_triton(cpu, "triton")


def test_vocab_chunk_sizes():
    assert triton_ops.vocab_chunk(100, 16, 40, 32, chunk_size=None) == 64  # whole tiles, never past the shard
    assert triton_ops.vocab_chunk(16384, 4096, 128256, 128, chunk_size=None) == 4096  # N x H elements
    assert triton_ops.vocab_chunk(10, 16, 1000, 32, chunk_size=2) == 192  # as many elements as 2 PyTorch rows


def _tp2_public_api():
    """Real TP=2 (gloo): each rank holds half the padded vocabulary and runs the public API on it."""
    tp_group, _ = tp_dp_groups(2, 1)
    rank = group_rank(tp_group)
    hidden, weight, target = make(torch.float32, pad=4)  # 44 rows: 22 per rank, the second one padded
    truncr = {"drop": 0.5, "granularity": "sequence", "min_count": 1, "buffer_size": 64}
    for name, params in (("cdiv", {"alpha": 1.4}), ("truncr", truncr)):
        ref, rgh, rgw = reference(hidden, weight, target, name, params, V)
        for entry in ("fused", "logits"):
            shard = weight[rank * 22 : (rank + 1) * 22]
            out, gh, gw = run(
                entry, "triton", hidden, shard, target, build_loss(name, **params), "cpu", tp_group=tp_group,
                vocab_size=V,
            )  # fmt: skip
            assert out.stats["loss"] == pytest.approx(float(ref), rel=2e-5), (entry, name)
            gh = all_reduce_(gh.clone(), "sum", tp_group)  # the hidden gradient is a partial sum over TP
            assert close(gh, rgh, 2e-5) and close(gw, rgw[rank * 22 : (rank + 1) * 22], 2e-5), (entry, name)
    dist.barrier()


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="gloo processes run the CPU interpreter")
def test_tp2_processes_match_single_process():
    run_distributed_test(_tp2_public_api, 2)


def _trainer_steps(kernel: str, backend: dict, out_dir: str, result_path: str):
    """Three optimizer steps of the tiny trainer (2 ranks, DP) with the loss head on ``kernel``."""
    import json
    import os

    from recall_dist.distributed.process_group import init_distributed
    from recall_dist.train.config import train_config_from_dict
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import endless, setup, train_step
    from tests.train.helpers import tiny_config_dict

    os.environ["RECALL_DIST_KERNEL"] = kernel
    cfg = train_config_from_dict(tiny_config_dict(out_dir, backend=backend, train={"micro_batch_size": 4}))
    cfg = cfg.with_environment()  # as run_training starts
    ctx = init_distributed()
    run = setup(cfg, validate_resources(cfg), ctx)
    data = endless(run.batches)
    steps = [train_step(run, data) for _ in range(3)]
    if dist.get_rank() == 0:
        keys = ("loss", "nll", "weight_mean", "grad_norm")
        with open(result_path, "w") as f:
            json.dump([{k: s[k] for k in keys} for s in steps], f)


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET, reason="gloo processes run the CPU interpreter")
def test_trainer_steps_equal_on_both_paths(tmp_path):
    """The trainer's real path (FSDP2, 2 DP ranks, c-Div): three optimizer steps with the loss head on
    the Triton kernels give the losses and gradient norms of the PyTorch path."""
    import json

    results = {}
    for kernel in ("torch", "triton"):
        path = tmp_path / f"{kernel}.json"
        run_distributed_test(_trainer_steps, 2, kernel, {"name": "fsdp2"}, str(tmp_path / kernel), str(path))
        results[kernel] = json.loads(path.read_text())
    for torch_step, triton_step in zip(results["torch"], results["triton"], strict=True):
        for key, value in torch_step.items():
            assert triton_step[key] == pytest.approx(value, rel=1e-5), (key, results)
