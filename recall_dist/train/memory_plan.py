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

With ``model.lora`` (peft LoRA adapters) only the adapters train: their count is exact from the shapes of
the targeted modules (``train/lora_plan.py``: r x (fan_in + fan_out) per module, peft's matching rules), and
gradients, fp32 masters and Adam moments exist for them alone; the frozen base sits at rest in
``model.dtype`` under FSDP2 (in the compute dtype under DeepSpeed), sharded like the parameters it
replaces.  The loss head then computes no weight gradient unless the head is a target, and each adapter
adds its r-wide activation (plus, with dropout, a dropped copy of its input and the mask).

With ``model.lora.quantize: 4bit`` (QLoRA) the linear layers of the decoder layers are bitsandbytes NF4 with
double quantisation, whole on every rank (FSDP2 leaves them out of sharding; ZeRO-2 replicates them; ZeRO-3 is
refused): ``qlora.four_bit_bytes`` per weight of n elements, ceil(n/2) packed bytes + ceil(n/64) 8-bit absmax
+ 4 * ceil(n/64/256) fp32 nested scales + 1092 bytes of codes and offset (about 0.516 byte per parameter;
equal to what bitsandbytes allocates, ``tests/train/test_qlora.py``).  The rest of the base (embedding, norms,
head) is counted as for LoRA.  Each 4-bit matmul dequantises its weight: one transient weight of the largest
4-bit layer in the compute dtype.  While the model is built, the 4-bit layers exist in full precision (the
build dtype) until they are quantised: a note in the output and, on CPU ranks, part of the host estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from torch import nn

from recall_dist.configtree import ConfigError
from recall_dist.train.lora_plan import lora_split

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
    trainable_params: int = 0  # what the optimizer updates: every parameter, or the LoRA adapters only
    frozen_params: int = 0  # the base model under LoRA (no gradient, no optimizer state); 0 without LoRA
    four_bit_build_bytes: float = 0.0  # QLoRA: the 4-bit layers in the build dtype, per rank, until quantised

    @property
    def total_bytes(self) -> float:
        return sum(self.rows.values())

    @property
    def host_bytes(self) -> float:
        return sum(self.host_rows.values())


def largest_layer_params(model: nn.Module) -> int:
    """Largest number of parameters owned directly by one module (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Model states, activations, host memory


def _frozen_bytes(cfg) -> int:
    """Bytes per frozen (LoRA base) parameter at rest: FSDP2 keeps ``model.dtype``, a DeepSpeed engine
    holds every module parameter in its compute dtype."""
    if cfg.backend.name == "fsdp2":
        return 2 if cfg.model.dtype == "bfloat16" else 4
    return 2 if cfg.backend.bf16 else 4


def _model_state_bytes(
    cfg, trainable: int, frozen: int, world: int, largest: int, four_bit: tuple[int, int, int] | None = None
) -> dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states.  ``trainable``: the parameters the
    optimizer updates (all of them, or the LoRA adapters); ``frozen``: the base under LoRA; ``four_bit``:
    under QLoRA, ``qlora.four_bit_split`` of the base (elements, bytes, bias elements of the 4-bit layers)."""
    b = cfg.backend
    low = 2 if b.bf16 else 4  # bytes of a working parameter / gradient
    master = 4 if b.bf16 else 0  # fp32 master copy (bf16 training only)
    lora = cfg.model.lora is not None
    what = "adapters" if lora else "parameters"
    grads = "adapter gradients" if lora else "gradients"
    states = "adapter optimizer states" if lora else "optimizer states"
    rows: dict[str, float] = {}
    if four_bit is not None:  # QLoRA: the decoder's linear layers in 4 bits, whole on every rank
        numel, nbytes, bias = four_bit
        rows["frozen base (4-bit NF4 layers, every rank)"] = nbytes + _frozen_bytes(cfg) * bias
        frozen -= numel + bias  # the rest of the base: as under LoRA
    if b.name == "fsdp2":  # fp32 sharded parameters are the master copy; unsharded low-precision units on the fly
        if lora:  # frozen: no master copy, kept in the dtype it was read in
            rows[f"frozen base (sharded {cfg.model.dtype})"] = _frozen_bytes(cfg) * frozen / world
        rows[f"{what} (sharded fp32)"] = 4 * trainable / world
        rows["parameters (2 unsharded units)"] = 2 * low * largest
        rows[f"{grads} (sharded fp32)"] = 4 * trainable / world
        rows[f"{states} (Adam m, v)"] = 8 * trainable / world
    else:
        shard_params = b.zero_stage == 3
        if lora:  # stage 3 partitions frozen parameters too
            rows["frozen base"] = _frozen_bytes(cfg) * frozen / (world if shard_params else 1)
        rows[what] = low * trainable / (world if shard_params else 1)
        rows[grads] = low * trainable / world
        rows[f"{states} (master + Adam m, v)"] = (master + 8) * trainable / world
        if shard_params:
            rows["parameters (gathered layer)"] = low * largest
    if b.cpu_offload:  # DeepSpeed offloads the fp32 states and the gradient partitions (and at stage 3 the
        offloaded = [k for k in rows if k.startswith((states, grads))]  # parameters); FSDP2 all shards
        if b.name == "fsdp2" or b.zero_stage == 3:
            offloaded += [
                k for k in rows if k.startswith(("frozen base", what)) and not k.endswith(("units)", "layer)"))
            ]
        for key in offloaded:
            rows[key] = 0.0
    return rows


def _activation_bytes(cfg, model_cfg, seq_len: int, head_weight_grad: bool = True) -> dict[str, float]:
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
    head = head_bytes(s * b, h, model_cfg.vocab_size, cfg.loss.chunk_size, cfg.backend.bf16, head_weight_grad)
    name = "loss head (logits chunk + fp32 dW, dH)" if head_weight_grad else "loss head (logits chunk + fp32 dH)"
    return {"activations": kept, name: head}


def head_bytes(
    tokens: int, hidden: int, vocab: int, chunk_size: int | None, bf16: bool, weight_grad: bool = True
) -> int:
    """What the fused loss head allocates beyond its inputs for ``tokens`` rows (PyTorch path): one fp32
    logits chunk of ``chunk_rows`` rows (the head's own choice; plus its 16-bit copy for the matmuls
    under bf16), the fp32 accumulators of dW [vocab, hidden] (``weight_grad``: the head trains; a frozen
    head under LoRA has none) and dH [tokens, hidden], and under bf16 their 16-bit copies handed to
    autograd at the end.  Checked against the measured peak of live tensors in
    tests/train/test_models_plan.py."""
    from recall_dist.parallel.common import chunk_rows

    rows = min(tokens, chunk_rows(chunk_size, vocab, tokens, hidden))
    chunk = rows * vocab * (4 + (2 if bf16 else 0))
    return chunk + ((vocab * hidden if weight_grad else 0) + tokens * hidden) * (4 + (2 if bf16 else 0))


def _construction_bytes(
    cfg, params: int, largest: int, world: int, device: str, frozen: int = 0, four_bit_numel: int = 0
) -> float:
    """Host bytes one rank adds while its engine builds the model (see the module docstring); ``frozen`` of
    the ``params`` are a LoRA base, kept in ``model.dtype`` under FSDP2, ``four_bit_numel`` of those the QLoRA
    layers, whole on every rank in the build dtype until they are quantised."""
    b = cfg.backend
    compute = 2 if b.bf16 else 4
    if b.name == "fsdp2":
        sharded = 4 * (params - frozen) + _frozen_bytes(cfg) * (frozen - four_bit_numel)
        stored, offloaded = sharded / world + _frozen_bytes(cfg) * four_bit_numel, b.cpu_offload
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


def _host_rows(cfg, trainable: int, frozen: int, world: int, construction: float) -> dict[str, float]:
    b = cfg.backend
    rows = {"building the model (peak, per rank)": construction}
    if b.cpu_offload:  # offloaded fp32 masters, gradients and Adam moments live in host memory
        rows["offloaded optimizer states + gradients"] = 16 * trainable / world
        if frozen and (b.name == "fsdp2" or b.zero_stage == 3):  # the frozen shards go with the parameters
            rows["offloaded frozen base"] = _frozen_bytes(cfg) * frozen / world
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


def _four_bit_base(cfg):
    import dataclasses

    from recall_dist.train.models import build_model

    return build_model(dataclasses.replace(cfg.model, lora=None), meta=True)


def _four_bit_split(cfg) -> tuple[int, int, int] | None:
    """``qlora.four_bit_split`` of the base under ``quantize: 4bit`` (refused under ZeRO-3), else None."""
    lora = cfg.model.lora
    if lora is None or lora.quantize is None:
        return None
    from recall_dist.train.lora import check_quantize_backend
    from recall_dist.train.models import decoder_layers
    from recall_dist.train.qlora import four_bit_split

    check_quantize_backend(lora, cfg.backend)
    return four_bit_split(decoder_layers(_four_bit_base(cfg)))


def _largest_four_bit(cfg) -> int:
    from recall_dist.train.models import decoder_layers
    from recall_dist.train.qlora import decoder_linears

    return max(linear.weight.numel() for _, _, linear in decoder_linears(decoder_layers(_four_bit_base(cfg))))


def make_plan(cfg, nodes: int, gpus_per_node: int, seq_len: int | None = None, device: str = "cuda") -> Plan:
    """The memory plan of ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks (``device="cpu"``: CPU ranks)."""
    from recall_dist.train.backends.fsdp2 import sharding_plan
    from recall_dist.train.models import build_model, count_parameters

    if cfg.backend.bf16 == "auto":  # GPUs a plan is made for (Ampere and later) have bf16; CPU ranks: this CPU's
        from recall_dist.train.precision import native_bf16

        cfg.backend.bf16 = device == "cuda" or native_bf16("cpu")[0]
    model = build_model(cfg.model, meta=True)  # with the adapters injected under LoRA: what the engine shards
    world = nodes * gpus_per_node
    largest = largest_layer_params(model)
    model_cfg = model.config
    seq_len = seq_len or cfg.data.max_length or min(model_cfg.max_position_embeddings, 4096)
    if cfg.model.lora is None:
        trainable, frozen, head_grad, adapter_rows = count_parameters(model), 0, True, {}
    else:
        trainable, frozen, head_grad, adapter_rows = lora_split(cfg, model, seq_len)
    four_bit = _four_bit_split(cfg)
    params = trainable + frozen
    rows = {
        **_model_state_bytes(cfg, trainable, frozen, world, largest, four_bit),
        **_activation_bytes(cfg, model_cfg, seq_len, head_grad),
        **adapter_rows,
    }
    if four_bit is not None:  # each 4-bit matmul dequantises its weight (compute dtype), one at a time
        rows["4-bit layer dequantised for its matmul"] = (2 if cfg.backend.bf16 else 4) * _largest_four_bit(cfg)
    units = sharding_plan(model)
    covered = {name for names in units.values() for name in names}
    named = {name for name, _ in model.named_parameters()}
    if covered != named:
        raise RuntimeError(f"sharding plan misses {sorted(named - covered)[:5]}")
    # DeepSpeed's estimator assumes every parameter trains: no estimate to compare with under LoRA.
    ds_gpu, ds_cpu = (None, None) if frozen else _deepspeed_estimate(cfg, params, largest, nodes, gpus_per_node)
    construction = _construction_bytes(cfg, params, largest, world, device, frozen, four_bit[0] if four_bit else 0)
    host = _host_rows(cfg, trainable, frozen, world, construction)
    build_dtype_bytes = _frozen_bytes(cfg) if cfg.backend.name == "fsdp2" else (2 if cfg.backend.bf16 else 4)
    return Plan(
        rows,
        world,
        params,
        largest,
        ds_gpu,
        ds_cpu,
        len(units),
        len(covered),
        host,
        construction,
        trainable,
        frozen,
        build_dtype_bytes * four_bit[0] if four_bit else 0.0,
    )


def _lora_lines(plan: Plan, cfg) -> list[str]:
    lora = cfg.model.lora
    if lora is None:
        return []
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    share = plan.trainable_params / plan.frozen_params
    return [
        f"LoRA r={lora.r} on {targets}: {plan.trainable_params / 1e6:.2f}M trainable adapter parameters "
        f"({100 * share:.3f}% of the base), {plan.frozen_params / 1e9:.2f}B frozen; gradients and optimizer "
        "states for the adapters only",
        *(
            [
                "quantize: 4bit (QLoRA): the decoder's linear layers in bitsandbytes NF4 with double quantisation, "
                "whole on every rank (ceil(n/2) + ceil(n/64) + 4 ceil(n/16384) + 1092 bytes per weight of n "
                "elements); while the model is built they exist in full precision "
                f"({plan.four_bit_build_bytes / GIB:.2f} GiB per rank at the build's peak, in place of the 4-bit "
                "row) until each is quantised"
            ]
            if lora.quantize
            else []
        ),
    ]


def format_plan(plan: Plan, cfg, gpu_mem_gib: float) -> str:
    b = cfg.backend
    stage = f"ZeRO-{b.zero_stage}" if b.name == "deepspeed" else "FSDP2"
    lines = [
        f"model: {plan.total_params / 1e9:.2f}B parameters (largest layer {plan.largest_layer_params / 1e6:.1f}M), "
        f"{b.name} {stage}, bf16={b.bf16}, cpu_offload={b.cpu_offload}, {plan.world_size} GPUs",
        *_lora_lines(plan, cfg),
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
                    "trainable_params": plan.trainable_params,
                    "frozen_params": plan.frozen_params,
                    "four_bit_build_gib": plan.four_bit_build_bytes / GIB,
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
