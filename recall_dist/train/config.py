"""The training config tree: ``TrainConfig`` and its sections, validated when built.

YAML lives at the edge (``load_train_config``); ``model:`` may name a preset of
``recall_dist/presets/models/`` (``configs/models/`` in a checkout) or a file (``model: llama2-7b`` or
``model: path/to/model.yaml``).  Building a config reads no tokenizer, model or dataset: the checks
that need them (vocabulary sizes, dataset files) are ``train/resources.py``'s, which the running code
calls before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recall_dist.configtree import ConfigError, apply_overrides, check, from_dict, load_yaml
from recall_dist.data.config import DataConfig
from recall_dist.presets import DEEPSPEED_CONFIG_DIR, MODEL_PRESET_DIR

# The Llama-style attention and MLP projections: what peft users target for a Llama, Mistral, Qwen or OLMo.
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA adapters (Hugging Face ``peft``) on a frozen base: ``model.lora`` set (``{}`` for the defaults)
    trains only the adapters; null (the default) trains every weight.  ``train/lora.py`` applies it.

    ``r``, ``alpha`` and ``dropout`` are peft's ``r``, ``lora_alpha`` and ``lora_dropout`` (the adapter adds
    ``alpha / r * B A x``); ``target_modules`` names the adapted linear layers by their last name
    (``q_proj``) or is ``all-linear`` (every linear layer but the output head).  The head is frozen unless
    listed (``lm_head``).  ``merge_on_export``: ``final/`` holds the merged model (base + adapter, loadable
    with ``AutoModelForCausalLM``) instead of the adapter directory.  ``quantize: 4bit`` is QLoRA: the linear
    layers of the decoder layers (not the embedding nor the head) stored in 4 bits through bitsandbytes (NF4,
    double quantisation; ``train/qlora.py``), whole on every rank, under FSDP2 or ZeRO-2 (ZeRO-3 is refused),
    on CUDA or on CPU (bitsandbytes >= 0.48; slower there, not faster); checked when the run starts.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    merge_on_export: bool = False
    quantize: str | None = None  # null | 4bit (QLoRA: bitsandbytes, FSDP2 or ZeRO-2; checked when the run starts)

    def __post_init__(self):
        check(self.r >= 1, "r", self.r, "an integer >= 1 (the adapter rank)")
        check(self.alpha > 0, "alpha", self.alpha, "a number > 0 (the adapter is scaled by alpha / r)")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        check(self.quantize in (None, "4bit"), "quantize", self.quantize, "allowed: null, 4bit (QLoRA)")
        if isinstance(self.target_modules, str):
            check(
                self.target_modules == "all-linear",
                "target_modules",
                self.target_modules,
                "a list of module names (e.g. [q_proj, v_proj]) or 'all-linear'",
            )
        else:
            names = self.target_modules
            check(
                len(names) > 0 and all(isinstance(n, str) and n.strip() and "." not in n for n in names),
                "target_modules",
                names,
                "a non-empty list of module names without dots (e.g. [q_proj, v_proj]) or 'all-linear'",
            )
            check(len(set(names)) == len(names), "target_modules", names, "each module name once")

    @property
    def scaling(self) -> float:
        """The factor of the adapter's product: ``alpha / r`` (peft's ``scaling`` without rsLoRA)."""
        return self.alpha / self.r


@dataclass
class ModelConfig:
    """A Hugging Face causal LM: pretrained (``name_or_path``: a local directory with safetensors, or a
    hub name resolved through the Hugging Face cache) or randomly initialised from ``config`` (a
    ``transformers`` config dict with ``model_type``; the weights then depend only on ``train.seed``).

    ``dtype`` is the dtype of the weights *at rest*: how ``name_or_path`` is read and what ``final/`` is
    written in.  Training always keeps fp32 master weights and optimizer states; the compute dtype is
    ``backend.bf16`` (which defaults to ``dtype == bfloat16``).  With ``lora`` only the adapters train
    (fp32 masters and optimizer states); the frozen base stays in ``dtype`` (``LoraConfig``).
    """

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None  # defaults to name_or_path; "char:<task>" for the synthetic tasks
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    lora: LoraConfig | None = None  # null: every weight trains; a mapping: LoRA adapters on a frozen base

    def __post_init__(self):
        if (self.name_or_path is None) == (self.config is None):
            raise ConfigError(
                "name_or_path",
                "give exactly one of model.name_or_path (pretrained) and model.config (random init from a config dict)",
            )
        if self.config is not None:
            check(
                "model_type" in self.config,
                "config",
                self.config,
                "a transformers config dict with a 'model_type' key (e.g. llama, olmo)",
            )
        if self.tokenizer is None and self.name_or_path is None:
            raise ConfigError("tokenizer", "is required when the model is built from model.config")

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.name_or_path

    def hf_config(self):
        """The ``transformers`` config object of this model (no weights loaded)."""
        from transformers import AutoConfig

        if self.config is not None:
            params = dict(self.config)
            return AutoConfig.for_model(params.pop("model_type"), **params)
        return AutoConfig.from_pretrained(self.name_or_path)


@dataclass
class LossConfig:
    """A weight rule of ``recall_dist.build_loss`` and its parameters (README, "How the losses work"), and
    how the loss head runs it: ``chunk_size`` and the kernel choices (``docs/kernels.md``).  The
    ``RECALL_DIST_*`` variables that are set override the kernel keys once, when a run starts
    (``with_environment``), so the config a run saves says which kernel it used."""

    name: str = "nll"
    params: dict[str, Any] = field(default_factory=dict)
    chunk_size: int | None = None  # tokens per chunk of the fused head; None: the loss's default
    kernel: str = "auto"  # auto | torch | triton ($RECALL_DIST_KERNEL)
    head_schedule: str = "recompute"  # recompute | single: the Triton fused head ($RECALL_DIST_HEAD_SCHEDULE)
    head_matmul: str = "triton"  # triton | cublas: the Triton fused head's logits ($RECALL_DIST_HEAD_MATMUL)
    triton_tiles: list[int] | None = None  # [bn, bv, bk, warps, stages, splits] on the GPU ($RECALL_DIST_TRITON_TILES)

    def __post_init__(self):
        from recall_dist.losses import known_rules
        from recall_dist.parallel.options import KernelOptionError

        known = list(known_rules())
        check(self.name in known, "name", self.name, f"allowed: {', '.join(known)}")
        check(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", self.chunk_size, "an integer >= 1 or null")
        try:
            self.kernel_options()
        except KernelOptionError as e:
            raise ConfigError(e.key, f"{e.value!r} is not allowed; allowed: {e.allowed}") from None
        self.build()  # validated by building a throwaway one: the rule that owns a parameter names it

    def build(self):
        """A new loss as this config describes it, on every call: a stateful rule (TruncR's quantile
        buffer) is never shared by two callers."""
        from recall_dist.losses import LossParamError, build_loss

        try:
            return build_loss(self.name, **self.params)
        except LossParamError as e:
            raise ConfigError(f"params.{e.param}", f"{self.params.get(e.param)!r}: {e}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError("params", f"{self.params!r}: {e}") from None

    def kernel_options(self):
        """The kernel keys as a ``KernelOptions`` (``recall_dist/parallel/options.py``), as they stand:
        after ``with_environment`` they are what the run uses."""
        from recall_dist.parallel.options import KernelOptions

        return KernelOptions(self.kernel, self.head_schedule, self.head_matmul, self.triton_tiles)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> LossConfig:
        """This config with every kernel key whose ``RECALL_DIST_*`` variable is set in ``environ``
        (``os.environ``) replaced by that value (``KernelOptions.from_env``).  A run calls it once, at its
        start; nothing reads the variables after that.  A bad value raises ``ConfigError`` naming the key
        and the variable."""
        from recall_dist.parallel.options import ENV, KernelOptionError, KernelOptions

        try:
            options = KernelOptions.from_env(self.kernel_options(), environ)
        except KernelOptionError as e:
            raise ConfigError(
                f"loss.{e.key}",
                f"${ENV[e.key]}={e.value!r} (it overrides loss.{e.key}) is not allowed; allowed: {e.allowed}",
            ) from None
        tiles = None if options.triton_tiles is None else list(options.triton_tiles)
        return dataclasses.replace(
            self,
            kernel=options.kernel,
            head_schedule=options.head_schedule,
            head_matmul=options.head_matmul,
            triton_tiles=tiles,
        )


@dataclass
class OptimConfig:
    """Adam(W) with a warm-up then a constant, linear or cosine schedule (stepped once per optimizer step)."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self):
        check(self.lr > 0, "lr", self.lr, "a learning rate > 0")
        check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        check(self.eps > 0, "eps", self.eps, "a number > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")


@dataclass
class BackendConfig:
    """DeepSpeed ZeRO (stage 2 or 3, JSON presets in ``recall_dist/presets/deepspeed/``) or PyTorch FSDP2
    (``fully_shard`` per decoder layer, then the root)."""

    name: Literal["deepspeed", "fsdp2"] = "deepspeed"
    zero_stage: int = 2
    deepspeed_config: str | None = None  # JSON path; None: the zero{stage}[_offload].json preset
    # bf16 compute (fp32 masters either way); None: model.dtype == bfloat16; auto: bf16 where the GPU or CPU
    # has native bf16, else fp32, decided at start and saved as true/false (train/precision.py)
    bf16: bool | Literal["auto"] | None = None
    cpu_offload: bool = False  # DeepSpeed: optimizer (and at stage 3 parameter) offload; FSDP2: CPUOffloadPolicy
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    fsdp_reshard_after_forward: bool = True

    def __post_init__(self):
        check(self.zero_stage in (2, 3), "zero_stage", self.zero_stage, "allowed: 2, 3")
        if self.name == "deepspeed":
            path = Path(self.resolved_deepspeed_config())
            check(path.is_file(), "deepspeed_config", str(path), "an existing DeepSpeed JSON file")

    def resolved_deepspeed_config(self) -> str:
        if self.deepspeed_config is not None:
            return self.deepspeed_config
        suffix = "_offload" if self.cpu_offload and self.zero_stage == 3 else ""
        return str(DEEPSPEED_CONFIG_DIR / f"zero{self.zero_stage}{suffix}.json")


@dataclass
class TrainSection:
    """Batching, length of the run, logging, checkpoints and resumption."""

    output_dir: str = "runs/default"
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: micro_batch_size * dp * gradient_accumulation_steps
    gradient_accumulation_steps: int = 1  # ignored when global_batch_size is set
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops before the end of the epochs
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end / on preemption
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | a checkpoint directory
    # An output_dir holding another run: refused, unless overwrite moves that run to previous_runs/<time>/.
    overwrite: bool = False
    allow_config_change: bool = False  # resume a checkpoint whose model/loss/optim/data differ (logged)
    max_bad_steps: int = 3  # consecutive non-finite steps after which the run stops as diverged (exit 3)
    verify_checkpoints: Literal["checksum", "size", "none"] = "checksum"  # manifest check before a resume
    max_restarts: int = 0  # torchrun --max-restarts under slurm/ (every rank restarts from the last checkpoint)
    # Optimizer steps between passes over the validation set (data.eval_split / data.eval_source), and
    # after the last step; 0: after the last step only (when a validation set is given).
    eval_every: int = 0
    gradient_checkpointing: bool = False
    dist_timeout_minutes: float = 30.0  # collectives' timeout: a 13B checkpoint save can take minutes
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    export_final: bool = True
    # Checkpoint the last step (fp32 masters + Adam states, what a resume needs); false: only final/, and the
    # finished run cannot be resumed or extended (README "Training")
    final_checkpoint: bool = True
    # Warn when the step's ESS / tokens stays under ess_warn_fraction for ess_warn_steps steps in a row (0: never)
    ess_warn_fraction: float = 0.05
    ess_warn_steps: int = 5

    def __post_init__(self):
        check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "an integer >= 1")
        check(
            self.global_batch_size is None or self.global_batch_size >= 1,
            "global_batch_size",
            self.global_batch_size,
            "an integer >= 1 or null",
        )
        check(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "an integer >= 1",
        )
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1 or null")
        check(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        check(self.dist_timeout_minutes > 0, "dist_timeout_minutes", self.dist_timeout_minutes, "a number > 0")
        check(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "an integer >= 1")
        check(self.max_restarts >= 0, "max_restarts", self.max_restarts, "an integer >= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "an integer >= 0 (0: after the last step only)")
        check(
            self.resume in ("auto", "none") or Path(self.resume).is_dir(),
            "resume",
            self.resume,
            "allowed: auto, none, or an existing checkpoint directory",
        )
        check(self.output_dir.strip() != "", "output_dir", self.output_dir, "a directory path")
        check(
            self.final_checkpoint or self.export_final,
            "final_checkpoint",
            self.final_checkpoint,
            "true when train.export_final is false (the run would save nothing at its end)",
        )
        check(0 <= self.ess_warn_fraction < 1, "ess_warn_fraction", self.ess_warn_fraction, "a number in [0, 1)")
        check(self.ess_warn_steps >= 1, "ess_warn_steps", self.ess_warn_steps, "an integer >= 1")

    def accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} is not a multiple of "
                f"micro_batch_size ({self.micro_batch_size}) x data-parallel size ({dp_size})",
            )
        return self.global_batch_size // per_step


@dataclass
class TrainConfig:
    """The whole run: ``recall-dist train CONFIG.yaml key=value ...`` builds one of these."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if self.backend.bf16 is None:  # one rule for both backends: compute in the dtype the weights are stored in
            self.backend.bf16 = self.model.dtype == "bfloat16"
        if self.train.eval_every and not self.data.has_eval_set:
            raise ConfigError(
                "train.eval_every",
                f"{self.train.eval_every}: there is no validation set: set data.eval_split (a split of "
                "data.source, e.g. test, or train[90%:] with data.split train[:90%]) or data.eval_source "
                "(a file, folder or hub dataset)",
            )

    def with_environment(self, environ: Mapping[str, str] | None = None) -> TrainConfig:
        """This config with the environment's overrides applied (the kernel keys:
        ``LossConfig.with_environment``), read once when a run starts: what it runs and saves."""
        return dataclasses.replace(self, loss=self.loss.with_environment(environ))


def _resolve_model_file(value: str, base: Path | None) -> dict:
    candidates = [Path(value)]
    if base is not None:
        candidates.append(base / value)
    candidates.append(MODEL_PRESET_DIR / f"{value}.yaml")
    for path in candidates:
        if path.is_file():
            return load_yaml(path)
    presets = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
    raise ConfigError("model", f"{value!r} is neither a model YAML file nor a preset; presets: {', '.join(presets)}")


def train_config_from_dict(data: dict, base: Path | None = None) -> TrainConfig:
    """Build a ``TrainConfig`` from a plain dict (a string ``model`` names a model YAML or preset)."""
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = _resolve_model_file(data["model"], base)
    return from_dict(TrainConfig, data)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read YAML ``path``, apply ``key=value`` overrides (``model=olmo-1b`` picks a preset), validate."""
    data = load_yaml(path) if path is not None else {}
    model_override = [o for o in overrides if o.startswith("model=")]
    rest = [o for o in overrides if not o.startswith("model=")]
    for item in model_override:  # a preset name / model YAML path, or a whole {name_or_path: ...} mapping
        data["model"] = yaml.safe_load(item.split("=", 1)[1])
    base = Path(path).parent if path is not None else None
    if isinstance(data.get("model"), str):
        data["model"] = _resolve_model_file(data["model"], base)
    apply_overrides(data, rest)
    return train_config_from_dict(data, base)
