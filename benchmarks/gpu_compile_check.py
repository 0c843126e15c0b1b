"""Compile the Triton kernels of the loss head for a CUDA target without a GPU (Triton ships ptxas):
catches type and lowering errors before GPU time is spent, and prints what each kernel became.

    .venv/bin/python benchmarks/gpu_compile_check.py [--arch 90] [--hidden 4096] [--vocab 128256]

Prints, per kernel and dtype: compile seconds, shared memory (multi-buffered when the loads are
pipelined), whether ``tl.dot`` became Hopper's warp-group MMA (wgmma), and the count of ``cp.async``
instructions (asynchronous, pipelined loads) in the PTX.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compile_all(arch: int, hidden: int, vocab: int) -> list[str]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from recall_dist.parallel import triton_kernels as K
    from recall_dist.parallel.triton_ops import LOGITS_TILE, Tiles, cdiv, default_tiles

    target = GPUTarget("cuda", arch, 32)
    ptr = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        t: Tiles = default_tiles(dtype)
        flags = {"UPCAST": False, "PRECISION": "tf32" if dtype != torch.float32 else "ieee"}
        tiles = {"BLOCK_N": t.block_n, "BLOCK_V": t.block_v, "BLOCK_K": t.block_k}
        per_split = cdiv(cdiv(vocab, t.block_v), t.splits)
        p = ptr[dtype]
        jobs = {
            "head_stats_kernel": (
                K.head_stats_kernel,
                [p, p, "*i64", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i32", "i32", "i32"],
                {"HIDDEN": hidden, "TILES_PER_SPLIT": per_split, **tiles, **flags},
            ),
            "head_grad_kernel": (
                K.head_grad_kernel,
                [p, p, "*i64", "*i64", "*fp32", "*fp32", p, "i32", "i32", "i32", "i32", "i32", "i32"],
                {"HIDDEN": hidden, **tiles, **flags},
            ),
            "logits_stats_kernel": (
                K.logits_stats_kernel,
                [p, "*i64", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i32"],
                {"N_COLS": vocab, "ROWS": LOGITS_TILE[0], "BLOCK_V": LOGITS_TILE[1]},
            ),
            "logits_grad_kernel": (
                K.logits_grad_kernel,
                [p, p, "*i64", "*i64", "*fp32", "*fp32", "i32", "i32", "i32"],
                {"N_COLS": vocab, "ROWS": LOGITS_TILE[0], "BLOCK_V": LOGITS_TILE[1]},
            ),
        }
        for name, (fn, runtime, constexprs) in jobs.items():
            names = fn.arg_names
            signature = dict(zip(names[: len(runtime)], runtime, strict=True)) | dict.fromkeys(constexprs, "constexpr")
            # what the JIT infers at launch from torch's allocations: 16-aligned pointers, strides that are
            # multiples of 16 (H=4096, V chunks); without these hints nothing is pipelined
            aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a.endswith(("_ptr", "stride_h"))}
            aligned |= {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a.startswith("stride_")}
            start = time.perf_counter()
            options = {"num_warps": t.num_warps, "num_stages": t.num_stages} if name.startswith("head") else {}
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs=aligned), target=target, options=options)
            ir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
            lines.append(
                f"{name:<20} {str(dtype).replace('torch.', ''):<9} {time.perf_counter() - start:5.1f} s  "
                f"shared {kernel.metadata.shared:>6} B  wgmma {'yes' if 'warp_group_dot' in ir else 'no':<3}  "
                f"cp.async {ptx.count('cp.async'):>3}"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    args = p.parse_args()
    compile_all(args.arch, args.hidden, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
