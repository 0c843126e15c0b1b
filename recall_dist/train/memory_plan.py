"""``recall-dist plan CONFIG.yaml --nodes N --gpus-per-node G``: per-GPU memory of a training config.

The model is built on the meta device (no weights, no GPU).  Model states follow the mixed-precision
Adam accounting of the ZeRO paper (bf16 parameters and gradients, fp32 master copy and two Adam
moments); DeepSpeed's own ``estimate_zero{2,3}_model_states_mem_needs`` is printed next to ours.
Activations use Korthikanti et al. (2022): per layer s*b*h*(34 + 5*a*s/h) bytes in 16 bit, only the
layer inputs kept under gradient checkpointing (plus one layer being recomputed).  The fused loss head
adds one fp32 logits chunk (sized by the head's own ``chunk_rows``), the fp32 output-weight gradient and
the fp32 hidden gradient it accumulates.

Host memory per rank follows the construction path of ``train/backends`` (``train/weights.py``): a rank
allocates only its own shards (FSDP2: fp32 masters; ZeRO-3: partitions in the compute dtype; ZeRO-2: every
parameter) plus one module at a time being built -- the fp32 CPU twin of the largest module for a seeded
init, or the rows of one tensor read from safetensors.  On GPUs the shards live on the device and the host
holds the transient and anything offloaded; ``--device cpu`` (CPU training) puts everything on the host.
``tests/train/test_construction_memory.py`` checks the construction estimate against measured peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from torch import nn

from recall_dist.configtree import ConfigError

GIB = 1024**3


@dataclass
class Plan:
    rows: dict[str, float]  # component -> bytes per GPU
    world_size: int
    total_params: int
    largest_layer_params: int
    deepspeed_estimate_gib: float | None
    deepspeed_cpu_gib: float | None
    sharding_units: int
    covered_params: int
    host_rows: dict[str, float]  # component -> host bytes per rank
    construction_bytes: float  # host bytes one rank adds while the engine builds its model

    @property
    def total_bytes(self) -> float:
        return sum(self.rows.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host_rows.values())


def largest_layer_params(model: nn.Module) -> int:
    """Largest number of parameters owned directly by one module (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _model_state_bytes(cfg, params: int, world: int, largest: int) -> dict[str, float]:
    b = cfg.backend
    low = 2 if b.bf16 else 4  # bytes of a working parameter / gradient
    master = 4 if b.bf16 else 0  # fp32 master copy (bf16 training only)
    if b.name == "fsdp2":  # fp32 sharded parameters are the master copy; unsharded low-precision units on the fly
        rows = {
            "parameters (sharded fp32)": 4 * params / world,
            "parameters (2 unsharded units)": 2 * low * largest,
            "gradients (sharded fp32)": 4 * params / world,
            "optimizer states (Adam m, v)": 8 * params / world,
        }
    else:
        shard_params = b.zero_stage == 3
        rows = {
            "parameters": low * params / (world if shard_params else 1),
            "gradients": low * params / world,
            "optimizer states (master + Adam m, v)": (master + 8) * params / world,
        }
        if shard_params:
            rows["parameters (gathered layer)"] = low * largest
    if b.cpu_offload:  # DeepSpeed offloads the fp32 states and the gradient partitions (and at stage 3 the
        offloaded = [k for k in rows if k.startswith(("optimizer", "gradients"))]  # parameters); FSDP2 all shards
        if b.name == "fsdp2" or b.zero_stage == 3:
            offloaded += [k for k in rows if k in ("parameters", "parameters (sharded fp32)")]
        for key in offloaded:
            rows[key] = 0.0
    return rows


def _activation_bytes(cfg, model_cfg, seq_len: int) -> dict[str, float]:
    from recall_dist.train.models import resolve_attn_implementation

    b, s = cfg.train.micro_batch_size, seq_len
    h, layers = model_cfg.hidden_size, model_cfg.num_hidden_layers
    heads = model_cfg.num_attention_heads
    scale = 1.0 if cfg.backend.bf16 else 2.0  # the formula counts 16-bit activations; fp32 doubles it
    # SDPA / flash attention never store the s x s scores: the 5*a*s/h term drops.
    scores = 0 if resolve_attn_implementation(cfg.model.attn_implementation, "cuda") != "eager" else 5 * heads * s / h
    per_layer = s * b * h * (34 + scores) * scale
    if cfg.train.gradient_checkpointing:
        kept = layers * s * b * h * 2 * scale + per_layer
    else:
        kept = layers * per_layer
    head = head_bytes(s * b, h, model_cfg.vocab_size, cfg.loss.chunk_size, cfg.backend.bf16)
    return {"activations": kept, "loss head (logits chunk + fp32 dW, dH)": head}


def head_bytes(tokens: int, hidden: int, vocab: int, chunk_size: int | None, bf16: bool) -> int:
    """What the fused loss head allocates beyond its inputs for ``tokens`` rows (PyTorch path): one fp32
    logits chunk of ``chunk_rows`` rows (the head's own choice; plus its 16-bit copy for the matmuls
    under bf16), the fp32 accumulators of dW [vocab, hidden] and dH [tokens, hidden], and under bf16
    their 16-bit copies handed to autograd at the end.  Checked against the measured peak of live
    tensors in tests/train/test_models_plan.py."""
    from recall_dist.parallel.common import chunk_rows

    rows = min(tokens, chunk_rows(chunk_size, vocab, tokens, hidden))
    chunk = rows * vocab * (4 + (2 if bf16 else 0))
    return chunk + (vocab * hidden + tokens * hidden) * (4 + (2 if bf16 else 0))


def _construction_bytes(cfg, params: int, largest: int, world: int, device: str) -> float:
    """Host bytes one rank adds while its engine builds the model (see the module docstring)."""
    b = cfg.backend
    compute = 2 if b.bf16 else 4
    if b.name == "fsdp2":
        stored, offloaded = 4 * params / world, b.cpu_offload
    elif b.zero_stage == 3:
        stored, offloaded = compute * params / world, b.cpu_offload
    else:
        stored, offloaded = compute * params, False
    on_host = stored if (device == "cpu" or offloaded) else 0.0
    # One module at a time: the fp32 twin of a seeded init (a pretrained read holds less: one tensor's rows);
    # under zero.Init the module is also created whole in the compute dtype before it is partitioned.
    transient = 4 * largest if cfg.model.name_or_path is None else 0.0
    if b.name == "deepspeed" and b.zero_stage == 3:
        transient += compute * largest
    return on_host + transient


def _host_rows(cfg, params: int, largest: int, world: int, device: str, construction: float) -> dict[str, float]:
    b = cfg.backend
    rows = {"building the model (peak, per rank)": construction}
    if b.cpu_offload:  # offloaded fp32 masters, gradients and Adam moments live in host memory
        rows["offloaded optimizer states + gradients"] = 16 * params / world
    return rows


def _deepspeed_estimate(cfg, params: int, largest: int, nodes: int, gpus: int) -> tuple[float | None, float | None]:
    """DeepSpeed's (GPU, CPU-per-node) model-state estimates in GiB."""
    if cfg.backend.name != "deepspeed":
        return None, None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if cfg.backend.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest, gpus, nodes, cfg.backend.cpu_offload, cfg.backend.cpu_offload, zero_init=True
        )
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cfg.backend.cpu_offload)
    return gpu / GIB, cpu / GIB


def make_plan(cfg, nodes: int, gpus_per_node: int, seq_len: int | None = None, device: str = "cuda") -> Plan:
    """The memory plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks (``device="cpu"``: CPU ranks)."""
    from recall_dist.train.backends.fsdp2 import sharding_plan
    from recall_dist.train.models import build_model, count_parameters

    if cfg.backend.bf16 == "auto":  # GPUs a plan is made for (Ampere and later) have bf16; CPU ranks: this CPU's
        from recall_dist.train.precision import native_bf16

        cfg.backend.bf16 = device == "cuda" or native_bf16("cpu")[0]
    model = build_model(cfg.model, meta=True)
    world = nodes * gpus_per_node
    params, largest = count_parameters(model), largest_layer_params(model)
    model_cfg = model.config
    seq_len = seq_len or cfg.data.max_length or min(model_cfg.max_position_embeddings, 4096)
    rows = {**_model_state_bytes(cfg, params, world, largest), **_activation_bytes(cfg, model_cfg, seq_len)}
    units = sharding_plan(model)
    covered = {name for names in units.values() for name in names}
    named = {name for name, _ in model.named_parameters()}
    if covered != named:
        raise RuntimeError(f"sharding plan misses {sorted(named - covered)[:5]}")
    ds_gpu, ds_cpu = _deepspeed_estimate(cfg, params, largest, nodes, gpus_per_node)
    construction = _construction_bytes(cfg, params, largest, world, device)
    host = _host_rows(cfg, params, largest, world, device, construction)
    return Plan(rows, world, params, largest, ds_gpu, ds_cpu, len(units), len(covered), host, construction)


def format_plan(plan: Plan, cfg, gpu_mem_gib: float) -> str:
    b = cfg.backend
    stage = f"ZeRO-{b.zero_stage}" if b.name == "deepspeed" else "FSDP2"
    lines = [
        f"model: {plan.total_params / 1e9:.2f}B parameters (largest layer {plan.largest_layer_params / 1e6:.1f}M), "
        f"{b.name} {stage}, bf16={b.bf16}, cpu_offload={b.cpu_offload}, {plan.world_size} GPUs",
        f"sharding plan: {plan.sharding_units} units cover all {plan.covered_params} parameter tensors",
        f"{'component':<48}{'GiB/GPU':>10}",
    ]
    lines += [f"{name:<48}{value / GIB:>10.2f}" for name, value in plan.rows.items()]
    total = plan.total_bytes / GIB
    lines.append(f"{'total':<48}{total:>10.2f}")
    if plan.deepspeed_estimate_gib is not None:
        lines.append(f"{'(DeepSpeed estimator, model states only)':<48}{plan.deepspeed_estimate_gib:>10.2f}")
        lines.append(f"{'(DeepSpeed estimator, CPU RAM per node)':<48}{plan.deepspeed_cpu_gib:>10.2f}")
    verdict = "FITS" if total <= gpu_mem_gib else "DOES NOT FIT"
    lines.append(f"verdict: {verdict} in {gpu_mem_gib:g} GiB per GPU")
    lines.append(f"{'host memory':<48}{'GiB/rank':>10}")
    lines += [f"{name:<48}{value / GIB:>10.2f}" for name, value in plan.host_rows.items()]
    lines.append(f"{'(plus the Python/CUDA runtime, ~1-3 GiB)':<48}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="recall-dist plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. model=llama2-13b backend.zero_stage=3)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: data.max_length or the model's context)",
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the shards live (cpu: CPU ranks)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    from recall_dist.train.config import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes/--gpus-per-node", "must be >= 1")
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.seq_len, args.device)
    except ConfigError as e:
        print(f"recall-dist plan: config error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "rows_gib": {k: v / GIB for k, v in plan.rows.items()},
                    "total_gib": plan.total_bytes / GIB,
                    "fits": plan.total_bytes / GIB <= args.gpu_mem_gib,
                    "world_size": plan.world_size,
                    "total_params": plan.total_params,
                    "deepspeed_estimate_gib": plan.deepspeed_estimate_gib,
                    "deepspeed_cpu_gib": plan.deepspeed_cpu_gib,
                    "host_rows_gib": {k: v / GIB for k, v in plan.host_rows.items()},
                    "host_gib": plan.host_bytes / GIB,
                }
            )
        )
    else:
        print(format_plan(plan, cfg, args.gpu_mem_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
