"""One training step of a real model through the trainer's own code path (``recall_dist.train.trainer``
``setup`` + ``train_step``), per loss: step time, tokens/s, MFU, peak GPU and host memory, and the
step-time ratios of each loss to nll, measured in one run; plus ``recall-dist plan``'s prediction for
the same configuration.

    python benchmarks/gpu_train_7b.py --out DIR                           # Llama-2-7B, FSDP2, one GPU
    python benchmarks/gpu_train_7b.py --backend zero3_offload --out DIR   # DeepSpeed ZeRO-3 + CPU offload
    DS_ACCELERATOR=cpu python benchmarks/gpu_train_7b.py --tiny --out DIR # CPU check of the script

Random init (nothing is downloaded), sequence ``--seq`` tokens, activation checkpointing, bf16
compute (the trainer keeps fp32 master weights).  The batches are random token ids of exactly
``--seq`` tokens fed to ``train_step`` (the trainer's data iterator is built but not used: its
synthetic examples are a few tokens long).  Each loss writes ``DIR/train_<loss>.json`` as soon as it
is measured, so a run cut short keeps what it measured.  MFU counts the model's flops per token as
torchtitan does, 6 P + 12 L H T (P non-embedding parameters, attention counted without the causal
half; activation recomputation not counted), against the bf16 peak measured in this run (and
against ``--nominal-tflops``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# truncr per token: with one sequence per step, sequence-level truncation would drop whole steps
LOSSES = {
    "nll": {},
    "cdiv": {"alpha": 1.4},
    "truncr": {"drop": 0.5, "granularity": "token", "min_count": 1},
    "lambda_pr": {"lam": 0.5},
}


def train_config(args, loss: str, out_dir: str) -> dict:
    """The config dict of the run: a model preset, the loss, the backend, the trainer settings."""
    tiny = args.tiny
    backend = {"name": "fsdp2", "bf16": not tiny}
    if args.backend == "zero3_offload":
        backend = {"name": "deepspeed", "zero_stage": 3, "cpu_offload": True, "bf16": not tiny}
    return {
        "model": "tiny-llama" if tiny else args.model,
        "loss": {"name": loss, "params": LOSSES[loss]},
        "backend": backend,
        # built by setup (a few tokens per example); the measured batches are fed to train_step below
        "data": {"source": "synthetic:product", "task_params": {"max_factor": 30}, "num_samples": 64},
        "optim": {"name": "adam", "lr": 1e-6},
        "train": {
            "output_dir": out_dir,
            "micro_batch_size": 1,
            "global_batch_size": 1,
            "max_steps": args.warmup + args.steps,
            "gradient_checkpointing": True,
            "progress_bar": False,
            "export_final": False,
            "resume": "none",
        },
    }


def _model_override(cfg: dict) -> dict:
    """A preset whose tokenizer is a hub name gets the built-in character tokenizer (no download);
    its vocabulary is smaller than the model's, which the trainer allows."""
    from recall_dist.configtree import load_yaml
    from recall_dist.train.config import MODEL_PRESET_DIR

    model = load_yaml(MODEL_PRESET_DIR / f"{cfg['model']}.yaml")
    model["tokenizer"] = "char:product"
    return cfg | {"model": model}


def host_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so each loss reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_batches(vocab: int, seq: int, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        yield {
            "input_ids": ids,
            "labels": ids.clone(),
            "attention_mask": torch.ones_like(ids),
            "sequence_ids": torch.zeros_like(ids),
            "position_ids": torch.arange(seq).unsqueeze(0),
        }


def matmul_peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def flops_per_token(model, seq: int) -> tuple[float, int]:
    cfg = model.config
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embed = model.get_input_embeddings().weight.numel()
    heads_dim = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return 6 * (params - embed) + 12 * cfg.num_hidden_layers * heads_dim * seq, params


def measure_loss(args, loss: str, ctx, peak_tflops, out: Path) -> dict:
    """setup + (warmup + steps) x train_step for one loss; the result is written to out/train_<loss>.json."""
    import torch

    from recall_dist.train.config import train_config_from_dict
    from recall_dist.train.resources import validate_resources
    from recall_dist.train.trainer import setup, train_step

    cuda = ctx.device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config_from_dict(_model_override(train_config(args, loss, tmp))).with_environment()
        tokenizer = validate_resources(cfg)
        host_reset = reset_host_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run = setup(cfg, tokenizer, ctx)
        setup_s = time.perf_counter() - t0
        module = run.engine.module
        model = getattr(module, "model", module)
        per_token, params = flops_per_token(model, args.seq)
        param_dtypes = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})
        data = random_batches(model.config.vocab_size, args.seq, ctx.device)
        times, stats = [], {}
        for i in range(args.warmup + args.steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = train_step(run, data)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            print(f"  {loss} step {i}: {time.perf_counter() - t0:.3f} s loss {stats['loss']:.4f}", flush=True)
        step_s = statistics.median(times)
        tokens_per_s = args.seq / step_s
        result = {
            "loss": loss,
            "backend": args.backend,
            "parameters": params,
            "parameter_dtypes": param_dtypes,
            "seq": args.seq,
            "setup_s": setup_s,
            "step_s": step_s,
            "step_times_s": times,
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_token": per_token / 1e12,
            "mfu_measured_peak": per_token * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None,
            "mfu_nominal": per_token * tokens_per_s / (args.nominal_tflops * 1e12),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "peak_host_gib": host_peak_bytes() / 2**30,
            "host_peak_is_per_loss": host_reset,
            "last_stats": {k: v for k, v in stats.items() if isinstance(v, float)},
            "kernel": cfg.loss.kernel,  # resolved with $RECALL_DIST_KERNEL when cfg was built
        }
        del run, module, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    (out / f"train_{loss}.json").write_text(json.dumps(result, indent=1))
    return result


def plan_prediction(args, out: Path) -> str:
    """``recall-dist plan`` for the configuration measured here (one GPU of --gpu-mem-gib)."""
    cfg = _model_override(train_config(args, "nll", str(out / "plan_run")))
    path = out / f"plan_{args.backend}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "recall_dist", "plan", str(path), "--nodes", "1", "--gpus-per-node", "1"]
    cmd += ["--gpu-mem-gib", str(args.gpu_mem_gib), "--seq-len", str(args.seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    text = f"$ {' '.join(cmd[1:])}\n{proc.stdout}{proc.stderr}"
    (out / f"plan_{args.backend}.txt").write_text(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b", help="a preset of configs/models/")
    p.add_argument("--backend", default="fsdp2", choices=["fsdp2", "zero3_offload"])
    p.add_argument("--losses", nargs="+", default=["nll", "cdiv", "truncr"], choices=list(LOSSES))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--nominal-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    p.add_argument("--gpu-mem-gib", type=float, default=139.0)
    p.add_argument("--tiny", action="store_true", help="tiny Llama, fp32: checks the script on a CPU")
    p.add_argument("--out", required=True, help="directory for train_<loss>.json, plan_*.txt, summary.md")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(plan_prediction(args, out), flush=True)

    from recall_dist.distributed.process_group import init_distributed, shutdown

    ctx = init_distributed()
    peak = matmul_peak_tflops(ctx.device)
    print(f"# measured bf16 matmul peak: {peak:.0f} TFLOP/s" if peak else "# no GPU: MFU not measured", flush=True)
    results = {}
    try:
        for loss in args.losses:
            try:
                results[loss] = measure_loss(args, loss, ctx, peak, out)
                print("RESULT " + json.dumps(results[loss]), flush=True)
            except Exception as e:  # e.g. out of memory: report it, keep the other losses
                results[loss] = {"loss": loss, "error": f"{type(e).__name__}: {e}"[:500]}
                (out / f"train_{loss}.json").write_text(json.dumps(results[loss], indent=1))
                print(f"  {loss}: {results[loss]['error']}", flush=True)
                gc.collect()
    finally:
        shutdown(ctx)
    summary = summarize(results, args, peak)
    (out / f"summary_{args.backend}.md").write_text(summary)
    print(summary)
    return 0 if all("error" not in r for r in results.values()) else 1


def summarize(results: dict, args, peak) -> str:
    base = results.get("nll", {})
    lines = [
        f"{args.model if not args.tiny else 'tiny-llama'}, {args.backend}, seq {args.seq}, 1 micro-batch, activation "
        f"checkpointing; median of {args.steps} steps after {args.warmup} warm-up; bf16 matmul peak "
        f"{f'{peak:.0f}' if peak else '-'} TFLOP/s measured in this run",
        "",
        "| loss | step s | tokens/s | MFU (measured peak) | MFU (nominal) | peak GPU GiB | peak host GiB "
        "| time / nll |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss, r in results.items():
        if "error" in r:
            lines.append(f"| {loss} | failed: {r['error'][:120]} | | | | | | |")
            continue
        mfu = f"{r['mfu_measured_peak']:.3f}" if r["mfu_measured_peak"] else "-"
        gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
        ratio = f"{r['step_s'] / base['step_s']:.3f}" if "step_s" in base else "-"
        lines.append(
            f"| {loss} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {r['mfu_nominal']:.3f} | {gpu} | "
            f"{r['peak_host_gib']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
