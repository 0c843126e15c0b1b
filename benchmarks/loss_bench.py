"""Forward+backward time and peak extra memory of the LM-head loss: naive PyTorch (materialised
logits + F.cross_entropy), Liger-Kernel's fused linear cross-entropy (when importable; ``liger_fp32acc``:
with its weight gradient accumulated in fp32), and our
fused nll / cdiv / lambda_pr / truncr.  Prints a table of ratios measured in this one run, with the
distance to the matmul floor: 6 N H V flops at the peak matmul rate measured in the same run.

    python benchmarks/loss_bench.py                                  # CPU fp32, V=32000 and 128256
    python benchmarks/loss_bench.py --device cuda --dtype bf16 --tokens 16384 --hidden 4096 \\
        --seq-len 4096 --methods naive liger nll cdiv lambda_pr truncr nll@torch nll@cublas
    python benchmarks/loss_bench.py --quick                          # small sizes, seconds

A method ``name@variant`` runs our loss ``name`` on one implementation: ``@torch`` the PyTorch path,
``@triton`` the Triton path (the default on CUDA), ``@cublas`` the Triton path with cuBLAS logits
chunks (``RECALL_DIST_HEAD_MATMUL=cublas``), ``@single`` the Triton path's single-pass schedule
(``RECALL_DIST_HEAD_SCHEDULE=single``); a bare name takes the default dispatch.

Peak memory: on CUDA, ``max_memory_allocated`` minus what the inputs hold, every method in one
process per vocabulary (the allocator's peak is reset between methods); on CPU, the process's peak
RSS (VmHWM) minus its RSS once the inputs exist, every method in a fresh process run with
``MALLOC_MMAP_THRESHOLD_=65536`` (so freed tensors leave the RSS).  Each measured method prints a JSON
line as soon as it is done, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["naive", "liger", "liger_fp32acc", "nll", "cdiv", "lambda_pr", "truncr"]
DEFAULT_METHODS = ["naive", "liger", "nll", "cdiv", "lambda_pr", "truncr"]
OURS = ("nll", "cdiv", "lambda_pr", "truncr")
VARIANTS = {"": {}, "torch": {"RECALL_DIST_KERNEL": "torch"}, "triton": {"RECALL_DIST_KERNEL": "triton"}}
VARIANTS["cublas"] = {"RECALL_DIST_KERNEL": "triton", "RECALL_DIST_HEAD_MATMUL": "cublas"}
VARIANTS["single"] = {"RECALL_DIST_KERNEL": "triton", "RECALL_DIST_HEAD_SCHEDULE": "single"}
OPTION_ENV = ("RECALL_DIST_KERNEL", "RECALL_DIST_HEAD_MATMUL", "RECALL_DIST_HEAD_SCHEDULE")
LOSS_PARAMS = {
    "nll": {},
    "cdiv": {"alpha": 1.4},
    "lambda_pr": {"lam": 0.5},
    # warm buffer from the first step so truncation really drops half the sequences
    "truncr": {"drop": 0.5, "granularity": "sequence", "buffer_size": 1024, "min_count": 1},
}


def method_spec(method: str) -> tuple[str, str]:
    name, _, variant = method.partition("@")
    if name not in METHODS or variant not in VARIANTS or (variant and name not in OURS):
        raise argparse.ArgumentTypeError(
            f"method {method!r}: one of {', '.join(METHODS)}, or one of ours ({', '.join(OURS)}) with "
            f"@{', @'.join(v for v in VARIANTS if v)}"
        )
    return name, variant


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def matmul_peak_tflops(device, dtype) -> float:
    """Measured peak matmul rate: median of 10 timed square products after 3 warm-ups."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(13):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(method: str, hidden, weight, target, args):
    import torch.nn.functional as F

    from recall_dist import build_loss, fused_linear_loss

    name, variant = method_spec(method)
    n, hdim, vocab, seq = args.tokens, args.hidden, args.vocab, args.seq_len
    if name == "naive":
        return lambda: F.cross_entropy((hidden @ weight.t()).float().view(-1, vocab), target.view(-1)).backward()
    if name in ("liger", "liger_fp32acc"):  # liger_fp32acc: its weight gradient accumulated in fp32, as ours
        import torch
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32 if name == "liger_fp32acc" else None)
        return lambda: lce(weight, hidden, target.view(-1)).backward()
    for key in OPTION_ENV:
        os.environ.pop(key, None)
    os.environ.update(VARIANTS[variant])
    loss = build_loss(name, **LOSS_PARAMS[name])
    h3 = hidden.view(n // seq, seq, hdim)

    def step():
        fused_linear_loss(h3, weight, target, loss, chunk_size=args.chunk_size).loss.backward()

    return step


def measure(method: str, hidden, weight, target, args) -> dict:
    import torch

    dev = hidden.device
    step = make_step(method, hidden, weight, target, args)
    for _ in range(args.warmup):  # compiles Triton kernels; allocates .grad once (counted alike)
        step()
    _sync(dev)
    hidden.grad = weight.grad = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS:") * 1024
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM:") * 1024
    hidden.grad = weight.grad = None
    return {"time_ms": 1e3 * statistics.median(times), "peak_extra_mib": max(0, peak - base) / 2**20}


def worker(args) -> None:
    """Measure ``args.method`` (a comma-separated list) on one vocabulary; one JSON line per method."""
    import torch

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.method == "matmul_peak":
        print(json.dumps({"method": "matmul_peak", "tflops": matmul_peak_tflops(dev, dtype)}), flush=True)
        return
    n, hdim, vocab, seq = args.tokens, args.hidden, args.vocab, args.seq_len
    hidden = (torch.randn(n, hdim, device=dev) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, device=dev) * 0.02).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n // seq, seq), device=dev)
    for method in args.method.split(","):
        try:
            result = measure(method, hidden, weight, target, args)
        except Exception as e:  # one unavailable method (no liger, out of memory) must not hide the others
            result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({"method": method, "vocab": vocab, **result}), flush=True)


def run_worker(args, vocab: int, methods: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--method", ",".join(methods), "--vocab", str(vocab)]
    for k in ("device", "dtype", "tokens", "hidden", "seq_len", "repeats", "warmup", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    rows = []
    for line in proc.stdout:
        if line.startswith("{"):
            rows.append(json.loads(line))
            r = rows[-1]
            what = r.get("error") or f"{r.get('time_ms', 0):9.1f} ms  {r.get('peak_extra_mib', 0):8.1f} MiB"
            print(f"  V={vocab:>6} {r['method']:<14} {what}", file=sys.stderr, flush=True)
    err = proc.stderr.read()
    if proc.wait() != 0:
        print(
            f"  [V={vocab} {','.join(methods)}] worker failed: {(err.strip().splitlines() or ['?'])[-1]}",
            file=sys.stderr,
        )
    return rows


def ratio(a: dict, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.3f}" if b and key in b and b[key] > 0 else "-"


def table(results: dict, args, peak_tflops: float | None) -> str:
    lines = [
        "| V | method | fwd+bwd ms | peak extra MiB | time / liger | mem / liger | time / naive | mem / naive "
        "| time / our nll | matmul floor ms | time / floor |",
        "|" + "---|" * 11,
    ]
    for (vocab, method), r in results.items():
        liger, naive, ours = (results.get((vocab, m)) for m in ("liger", "naive", "nll"))
        floor = 6 * args.tokens * args.hidden * vocab / (peak_tflops * 1e12) * 1e3 if peak_tflops else None
        to_floor = ("-", "-") if floor is None else (f"{floor:.1f}", f"{r['time_ms'] / floor:.2f}")
        lines.append(
            f"| {vocab} | {method} | {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} | "
            f"{ratio(r, liger, 'time_ms')} | {ratio(r, liger, 'peak_extra_mib')} | "
            f"{ratio(r, naive, 'time_ms')} | {ratio(r, naive, 'peak_extra_mib')} | "
            f"{ratio(r, ours, 'time_ms')} | {to_floor[0]} | {to_floor[1]} |"
        )
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"{', '.join(METHODS)} and name@variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of our loss (default: its heuristic)")
    p.add_argument("--quick", action="store_true", help="N=512, H=256, V=8000: a smoke run in seconds")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.worker:
        for m in args.methods:
            try:
                method_spec(m)
            except argparse.ArgumentTypeError as e:
                p.error(str(e))
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args)
        return
    if args.quick:
        args.tokens, args.hidden, args.vocabs, args.seq_len = 512, 256, [8000], 128
    print(
        f"# loss_bench: device={args.device} dtype={args.dtype} N={args.tokens} H={args.hidden} "
        f"seq_len={args.seq_len} repeats={args.repeats} warmup={args.warmup} threads={args.threads}",
        flush=True,
    )
    peak_rows = _peak(args)
    peak = peak_rows[0]["tflops"] if peak_rows and "tflops" in peak_rows[0] else None
    print(
        f"# measured peak {args.dtype} matmul: {peak:.1f} TFLOP/s" if peak else "# matmul peak: unavailable", flush=True
    )
    results, errors = {}, {}
    for vocab in args.vocabs:
        groups = [args.methods] if args.device.startswith("cuda") else [[m] for m in args.methods]
        for group in groups:
            for r in run_worker(args, vocab, group):
                (errors if "error" in r else results)[(vocab, r["method"])] = r
    print("\n" + table(results, args, peak))
    for (vocab, method), r in errors.items():
        print(f"- V={vocab} {method}: not measured ({r['error']})")
    if args.json:
        out = {f"{v}/{m}": r for (v, m), r in {**results, **errors}.items()}
        with open(args.json, "w") as f:
            json.dump(out | {"matmul_peak_tflops": peak, "args": vars(args)}, f, indent=1)


def _peak(args) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--method", "matmul_peak", "--vocab", "0"]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    main()
