"""GPU training-step benchmark (needs CUDA): a 1B-class Llama (random init, bf16) trained with
Hugging Face's materialised-logits loss vs our fused head with ``nll`` and ``cdiv``; and whether
Llama-2-7B with DeepSpeed ZeRO-3 + CPU offload runs a step on one GPU.

    python benchmarks/gpu_train_step.py plain  [--layers 22 --hidden 2048 --seq 2048 --batch 8]
    python benchmarks/gpu_train_step.py zero3  [--model configs/models/llama2-7b.yaml]

Prints step time (median), tokens/s and peak GPU memory per variant, with ratios from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def llama_1b(layers: int, hidden: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def timed(step, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def plain(args) -> None:
    from recall_dist import build_loss
    from recall_dist.train.loss_head import CausalLMWithLossHead

    torch.manual_seed(0)
    model = llama_1b(args.layers, args.hidden, args.vocab).to("cuda", torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # a prompt: no loss on the first quarter
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    print(f"# 1B-class Llama: {n_params / 1e9:.2f}B params, batch {args.batch} x {args.seq} tokens, bf16, AdamW")
    rows = {}
    for variant in ("hf_logits", "nll", "cdiv"):
        if variant == "hf_logits":

            def step():
                model(input_ids=ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            wrapper = CausalLMWithLossHead(model, build_loss(variant))

            def step(wrapper=wrapper):
                loss, _ = wrapper(ids, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        torch.cuda.empty_cache()
        t, mem = timed(step, args.steps, args.warmup)
        rows[variant] = {"step_s": t, "tokens_per_s": args.batch * args.seq / t, "peak_gib": mem}
        print(
            f"  {variant:<10} {t * 1e3:8.1f} ms/step  {args.batch * args.seq / t:9.0f} tok/s  {mem:6.2f} GiB peak",
            flush=True,
        )
    base, ours = rows["hf_logits"], rows["nll"]
    print("\n| variant | ms/step | tokens/s | peak GiB | time / HF | mem / HF | time / our nll |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} | "
            f"{r['step_s'] / base['step_s']:.3f} | {r['peak_gib'] / base['peak_gib']:.3f} | "
            f"{r['step_s'] / ours['step_s']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def zero3(args) -> None:
    import deepspeed
    import yaml

    from recall_dist import build_loss
    from recall_dist.train.loss_head import CausalLMWithLossHead, register_zero3_head

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed()
    with open(args.ds_config) as f:
        ds = json.load(f)
    ds.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        optimizer={"type": "AdamW", "params": {"lr": 1e-6}},
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    with open(args.model) as f:
        spec = yaml.safe_load(f)
    params = dict(spec.get("config") or spec.get("model", {}).get("config"))
    cfg = AutoConfig.for_model(params.pop("model_type"), **params)
    t0 = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds, remote_device="cpu", pin_memory=True):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = sum(p.ds_numel for p in model.parameters())
    wrapper = CausalLMWithLossHead(model, build_loss("cdiv", alpha=1.4), chunk_size=None)
    register_zero3_head(wrapper)
    engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(), config=ds)
    print(
        f"# {args.model}: {n / 1e9:.2f}B params, ZeRO-3 + CPU offload (params+optimizer), built in "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda")
    for i in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, stats = engine(ids, ids.clone())
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        print(
            f"  step {i}: loss {stats['loss']:.4f} nll {stats['nll']:.4f} ess {stats['ess']:.1f} "
            f"{time.perf_counter() - t0:.1f} s, peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["plain", "zero3"])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default="configs/models/llama2-7b.yaml")
    p.add_argument("--ds-config", default="configs/deepspeed/zero3_offload.json")
    p.add_argument("--json")
    args = p.parse_args()
    plain(args) if args.mode == "plain" else zero3(args)


if __name__ == "__main__":
    main()
