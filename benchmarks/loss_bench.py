"""Forward+backward time and peak extra memory of the LM-head loss: naive PyTorch (materialised
logits + F.cross_entropy) vs our fused nll / cdiv / lambda_pr / truncr (and Liger's fused linear
cross-entropy when importable).  Prints a table of ratios measured in this one run.

    python benchmarks/loss_bench.py                                  # CPU fp32, V=32000 and 128256
    python benchmarks/loss_bench.py --device cuda --dtype bf16       # GPU
    python benchmarks/loss_bench.py --quick                          # small sizes, seconds

Every (vocab, method) runs in a fresh subprocess, so peak memory is clean: on CUDA it is
``max_memory_allocated`` minus what the inputs hold; on CPU it is the process's peak RSS (VmHWM)
minus its RSS once the inputs exist.  The CPU workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
every tensor is mmap-ed and returned to the OS when freed (glibc's dynamic threshold would otherwise keep
freed memory in the process and make RSS differences meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ["naive", "liger", "nll", "cdiv", "lambda_pr", "truncr"]
LOSS_PARAMS = {
    "nll": {},
    "cdiv": {"alpha": 1.4},
    "lambda_pr": {"lam": 0.5},
    # warm buffer from the first step so truncation really drops half the sequences
    "truncr": {"drop": 0.5, "granularity": "sequence", "buffer_size": 1024, "min_count": 1},
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from recall_dist import build_loss, fused_linear_loss

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, hdim, vocab, seq = args.tokens, args.hidden, args.vocab, args.seq_len
    hidden = (torch.randn(n, hdim, device=dev) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, device=dev) * 0.02).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n // seq, seq), device=dev)

    if args.method == "naive":

        def step():
            logits = hidden @ weight.t()
            F.cross_entropy(logits.float().view(-1, vocab), target.view(-1)).backward()
    elif args.method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss()

        def step():
            lce(weight, hidden, target.view(-1)).backward()
    else:
        loss = build_loss(args.method, **LOSS_PARAMS[args.method])

        def step():
            fused_linear_loss(
                hidden.view(n // seq, seq, hdim), weight, target, loss, chunk_size=args.chunk_size
            ).loss.backward()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (and allocates .grad once: counted in both methods alike)
    sync()
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
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM:") * 1024
    return {"time_ms": 1e3 * statistics.median(times), "peak_extra_mib": max(0, peak - base) / 2**20}


def run_one(args, vocab: int, method: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--vocab", str(vocab)]
    for k in ("device", "dtype", "tokens", "hidden", "seq_len", "repeats", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  [{method} V={vocab}] unavailable: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk of our loss (default: its heuristic)")
    p.add_argument("--quick", action="store_true", help="N=512, H=256, V=8000: a smoke run in seconds")
    p.add_argument("--json", help="also write the results to this JSON file")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.tokens, args.hidden, args.vocabs, args.seq_len = 512, 256, [8000], 128
    print(
        f"# loss_bench: device={args.device} dtype={args.dtype} N={args.tokens} H={args.hidden} "
        f"seq_len={args.seq_len} repeats={args.repeats} threads={args.threads}"
    )
    results = {}
    for vocab in args.vocabs:
        for method in args.methods:
            r = run_one(args, vocab, method)
            if r is not None:
                results[(vocab, method)] = r
                print(
                    f"  V={vocab:>6} {method:<10} {r['time_ms']:9.1f} ms  {r['peak_extra_mib']:8.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    header = "| V | method | fwd+bwd ms | peak extra MiB | time / naive | mem / naive | time / our nll |"
    print("\n" + header + "\n|" + "---|" * 7)
    for (vocab, method), r in results.items():
        naive, ours = results.get((vocab, "naive")), results.get((vocab, "nll"))
        ratio = lambda a, b, k: f"{a[k] / b[k]:.3f}" if b and b[k] > 0 else "-"  # noqa: E731
        print(
            f"| {vocab} | {method} | {r['time_ms']:.1f} | {r['peak_extra_mib']:.1f} | "
            f"{ratio(r, naive, 'time_ms')} | {ratio(r, naive, 'peak_extra_mib')} | {ratio(r, ours, 'time_ms')} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{v}/{m}": r for (v, m), r in results.items()} | {"args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
