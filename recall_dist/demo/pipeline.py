"""The one shape of every ``recall-dist demo*`` command: a ``Recipe`` says what a demo trains and sweeps,
and ``run_pipeline`` runs it: prepare -> fine-tunes (each reused with ``--resume`` when it finished)
-> sweep -> report.  Every training and sweep stage is a ``torchrun --nproc-per-node 2`` subprocess of
the real CLI (``demo/stages.py``; logs in ``OUT/logs/``).

Extension points: a new demo (``demo/runner.py``: products on a tiny Llama; ``demo/fortunes.py``: a
pretrained LM on human text) is one module with a ``Recipe`` subclass that sets
  - ``COMMAND`` (its CLI name), ``CONFIG_DIR`` (its ``finetune.yaml`` and ``sweep.yaml``), ``OUT`` (the
    default output directory) and ``QUICK`` (the CI-sized values ``quick()`` puts over ``full()``);
  - its own sizes as fields, read from its configs by ``configured(finetune, sweep)``;
  - ``prepare(progress, resume)``: the model and data every fine-tune starts from (convert a model,
    pre-train one, write a corpus or a prompt split) as a ``Prepared``: the model and the overrides
    that every fine-tune and the sweep get on top of the recipe's own;
  - ``report(result)``: ``summary.md`` (on the skeleton of ``demo/markdown.py``, verdicts from
    ``demo/verdicts.py``) and any other file; returns the summary's path;
  - optionally ``CONFIG_DIR/lora.yaml``: a fragment of ``finetune.yaml`` (``model.lora`` and whatever else
    adapters change, such as the learning rate) that ``--lora`` puts over every fine-tune.
The fields every recipe has are the model (``None``: the demo's default), the losses and seeds (one
fine-tune per ``Run``), the fine-tune sizes, the sweep's temperatures and the output directory; the
sweep's metric (``known_support`` or ``text``) and its sizes are in ``CONFIG_DIR/sweep.yaml`` and the
demo's fields.  A fine-tune's seed reaches the sweep as its model entry's ``seed`` and ``family``
fields (``eval/config.py``'s ``ModelSpec``), which reports and figures read; no name is parsed.

A known-support demo on a real LM fits the same way: ``configs/<demo>/sweep.yaml`` with ``metric:
known_support``; its recipe's fields the prompt split's sizes; ``prepare`` takes the model as
``prepare_model`` does and writes the training examples and the held-out support file,
returning them as ``Prepared(model, finetune=[model and data overrides], sweep=["support=FILE"])``;
``report`` reads ``sweep.csv`` with ``verdicts.read_families`` and writes its sections.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from recall_dist.configtree import load_yaml
from recall_dist.demo.stages import DemoError, fmt_time, run_stage

# The demos' configs ship inside the package (package data), so an installed ``recall-dist demo`` finds them.
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Setting:
    """One fine-tuning setting of a demo or of its recipe grid: the model name, the loss and its params, and
    the steps and lr when they differ from the demo's config (None: the config's).  The one shape of a
    demo's ``losses`` and a grid's ``points``."""

    name: str
    loss: str
    params: dict = field(default_factory=dict)
    steps: int | None = None
    lr: float | None = None

    def __post_init__(self):
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise DemoError(f"setting {self.name!r}: steps = {self.steps!r}; expected a positive integer (or None)")
        if self.lr is not None and (
            isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0
        ):
            raise DemoError(f"setting {self.name!r}: lr = {self.lr!r}; expected a positive number (or None)")

    def nll_reference(self) -> Setting:
        """NLL with this setting's steps and lr, named as the grids name it (``nll-lr6e-06-60steps``)."""
        suffix = (f"-lr{self.lr:g}" if self.lr is not None else "") + (f"-{self.steps}steps" if self.steps else "")
        return Setting("nll" + suffix, "nll", steps=self.steps, lr=self.lr)


# The models a demo trains, NLL first (the reference).
# TruncR and lambda-PR run at their defaults, the best settings of the demo's grid (README).
LOSSES = [
    Setting("nll", "nll"),
    Setting("cdiv-1.4", "cdiv", {"alpha": 1.4}),
    Setting("cdiv-2.0", "cdiv", {"alpha": 2.0}),
    Setting("truncr", "truncr"),
    Setting("lambda_pr", "lambda_pr", {"nll_mix": 0.5}),  # nll_mix is a shared option: not part of the rule's defaults
]


LORA_CONFIG = "lora.yaml"  # in a recipe's CONFIG_DIR: what --lora changes in its fine-tunes


def yaml_flow(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}"


def config_overrides(path: Path) -> list[str]:
    """The ``section.key=value`` overrides (YAML flow values) that put the config fragment ``path`` (a
    mapping of sections) over a config, one per key of each section."""
    import yaml

    def flow(value) -> str:  # PyYAML writes a float as 2.0e-04 (a float again when read), ends a scalar with ...
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30)
        return text.removesuffix("...\n").strip()

    return [
        f"{section}.{key}={flow(value)}" for section, keys in load_yaml(path).items() for key, value in keys.items()
    ]


@dataclass(frozen=True)
class Run:
    """One fine-tune of ``setting``: its model name (the setting's; ``-s<k>`` for seeds k > 0, so names stay
    distinct), the seed index ``seed`` (added to the configs' seeds) and ``seeded`` (the recipe repeats every
    setting over several seeds: the sweep's model entry then carries the seed).  The setting's name
    (``family``), loss, params, steps and lr are read from the setting itself."""

    name: str
    setting: Setting
    seed: int
    seeded: bool

    @property
    def family(self) -> str:
        return self.setting.name

    @property
    def loss(self) -> str:
        return self.setting.loss

    @property
    def params(self) -> dict:
        return self.setting.params

    @property
    def steps(self) -> int | None:  # None: the recipe's ``finetune_steps``
        return self.setting.steps

    @property
    def lr(self) -> float | None:  # None: the config's ``optim.lr``
        return self.setting.lr

    def model_entry(self, path: Path) -> str:
        """This model's entry of the sweep's ``models`` (YAML flow)."""
        labels = f", family: {self.family}, seed: {self.seed}" if self.seeded else ""
        return f"{{name: {self.name}, path: {path}{labels}}}"


def seed_runs(settings: list[Setting], seeds: int) -> list[Run]:
    """Every fine-tune of ``settings`` x ``seeds``, seed-major.  Seed 0 keeps the setting's bare name whatever
    ``seeds`` is, so ``--seeds 3 --resume`` reuses the fine-tunes of an earlier one-seed run."""
    for s in settings:
        if not isinstance(s, Setting):
            raise DemoError(f"a demo's losses are Settings (demo/pipeline.py); got {s!r}")
    return [
        Run(s.name if seed == 0 else f"{s.name}-s{seed}", s, seed, seeds > 1) for seed in range(seeds) for s in settings
    ]


def references(settings: list[Setting], strict: bool = True) -> dict[str, str]:
    """name -> the NLL setting it is read against: the NLL setting with the same steps and lr, so that a loss
    trained longer (or at another lr) is compared with NLL trained the same way, never with NLL at the
    config's.  An NLL setting with its own steps or lr is read against NLL at the config's (what training
    longer, or that lr, does alone); NLL at the config's has no reference (it is the reference).  A setting
    without its NLL reference is an error that names the setting to add (``strict``), or is left out (the
    report of the runs an interrupted call finished)."""
    nll: dict[tuple, str] = {}
    for s in settings:
        if s.loss == "nll":
            nll.setdefault((s.steps, s.lr), s.name)
    out = {}
    for s in settings:
        key = (s.steps, s.lr)
        if key not in nll:
            if not strict:
                continue
            steps, lr = s.steps or "the config's", s.lr or "the config's"
            raise DemoError(
                f"{s.name!r} trains {steps} steps at lr {lr} and no NLL setting does: add {s.nll_reference()!r} "
                "as its reference"
            )
        reference = nll[key]
        if reference == s.name:  # an NLL reference itself: read against NLL at the config's steps and lr
            reference = nll.get((None, None)) if key != (None, None) else None
        if reference is not None:
            out[s.name] = reference
    return out


def prepare_model(model: str | None = None) -> str:
    """The ``model.name_or_path`` to fine-tune: ``model`` as given, or SmolLM2 converted from GGUF (cached)."""
    if model is not None:
        return model
    from recall_dist.convert import convert_gguf, default_output_dir, smollm2_gguf

    return str(convert_gguf(smollm2_gguf(), default_output_dir()))


@dataclass
class Prepared:
    """What the prepare stage made: the model every fine-tune starts from, and the overrides that every
    fine-tune (``finetune``) and the sweep (``sweep``) get besides the recipe's own."""

    model: str
    finetune: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What the report stage reads: the prepared model, the sweep's overrides, wall and stage seconds
    (``None``: a fine-tune reused by ``--resume``)."""

    prepared: Prepared
    sweep_overrides: list[str]
    wall_seconds: float
    stage_seconds: dict[str, float | None]


@dataclass(kw_only=True)
class Recipe(ABC):
    """What one demo run trains and sweeps (module docstring: the extension points).  ``full()`` reads
    the sizes from ``CONFIG_DIR``'s configs, ``quick()`` is the CI-sized run."""

    COMMAND: ClassVar[str]  # the demo's CLI name
    CONFIG_DIR: ClassVar[Path]  # its finetune.yaml and sweep.yaml
    OUT: ClassVar[str]  # its default output directory
    QUICK: ClassVar[dict] = {}  # the CI-sized values quick() puts over full()

    finetune_steps: int
    global_batch: int
    temperatures: list[float]
    train_seed: int = 0
    data_seed: int | None = None  # None: the fine-tunes keep the config's data seed, whatever the run's seed
    losses: list[Setting] = field(default_factory=lambda: list(LOSSES))
    seeds: int = 1
    model: str | None = None  # None: the demo's own model (pre-trained or converted by ``prepare``)
    lora: bool = False  # fine-tune LoRA adapters: CONFIG_DIR/lora.yaml over every fine-tune's config
    out: Path  # full(): OUT

    @classmethod
    def full(cls) -> Recipe:
        finetune, sweep = load_yaml(cls.CONFIG_DIR / "finetune.yaml"), load_yaml(cls.CONFIG_DIR / "sweep.yaml")
        return cls(
            finetune_steps=finetune["train"]["max_steps"],
            global_batch=finetune["train"]["global_batch_size"],
            temperatures=list(sweep["temperatures"]),
            train_seed=finetune["train"]["seed"],
            out=Path(cls.OUT),
            **cls.configured(finetune, sweep),
        )

    @classmethod
    def configured(cls, finetune: dict, sweep: dict) -> dict:
        """The demo's own fields, read from its ``finetune.yaml`` and ``sweep.yaml``."""
        return {}

    @classmethod
    def quick(cls) -> Recipe:
        return dataclasses.replace(cls.full(), losses=list(LOSSES[:2]), **copy.deepcopy(cls.QUICK))

    def runs(self) -> list[Run]:
        return seed_runs(self.losses, self.seeds)

    def steps_of(self, run: Run) -> int:
        """How many steps ``run`` fine-tunes: its own, or the recipe's ``finetune_steps``."""
        return run.steps or self.finetune_steps

    def lr_of(self, setting: Setting | Run) -> float:
        """The lr ``setting`` fine-tunes at: its own, or ``CONFIG_DIR/finetune.yaml``'s."""
        return (
            setting.lr if setting.lr is not None else float(load_yaml(self.CONFIG_DIR / "finetune.yaml")["optim"]["lr"])
        )

    def max_steps(self) -> int:
        """The steps of the longest fine-tune: the training data holds enough examples for it (a shorter one
        reads its first rows)."""
        return max((self.steps_of(r) for r in self.runs()), default=self.finetune_steps)

    def lora_overrides(self) -> list[str]:
        """The overrides ``CONFIG_DIR/lora.yaml`` puts over every fine-tune (none without ``lora``)."""
        return config_overrides(self.CONFIG_DIR / LORA_CONFIG) if self.lora else []

    # --- the hooks of one demo -----------------------------------------------------------------

    def banner(self) -> str:
        return f"recall-dist {self.COMMAND}: {len(self.losses)} losses x {self.seeds} seed(s); output in {self.out}"

    def prepare_stages(self) -> int:
        """How many numbered stages ``prepare`` announces."""
        return 0

    @abstractmethod
    def prepare(self, progress: Progress, resume: bool) -> Prepared:
        """The model and data every fine-tune starts from (each demo's own stages)."""

    def model_stage(self, progress: Progress) -> str:
        """A prepare stage of the demos on a pretrained LM: the model every fine-tune starts from
        (``prepare_model``), timed and announced."""
        label, start = progress.next_label(), time.monotonic()
        model = prepare_model(self.model)
        seconds = progress.times["model (convert or reuse)"] = time.monotonic() - start
        print(f"{label} model: {model} ({fmt_time(seconds)})", flush=True)
        return model

    def sweep_label(self, models: int) -> str:
        return f"sweep {models} models x {len(self.temperatures)} temperatures"

    @abstractmethod
    def report(self, result: Result) -> Path:
        """Write ``summary.md`` (and the demo's other files); return the summary's path."""

    # --- the overrides every demo passes -------------------------------------------------------

    def finetune_overrides(self, prepared: Prepared, run: Run, run_dir: Path) -> list[str]:
        """The ``recall-dist train`` overrides of one fine-tune (on top of ``CONFIG_DIR/finetune.yaml``)."""
        return [
            *prepared.finetune,
            f"loss.name={run.loss}",
            f"loss.params={yaml_flow(run.params)}",
            f"train.output_dir={run_dir}",
            f"train.max_steps={self.steps_of(run)}",
            f"data.num_samples={self.steps_of(run) * self.global_batch}",
            f"train.seed={self.train_seed + run.seed}",
            *([f"data.seed={self.data_seed + run.seed}"] if self.data_seed is not None else []),
            *self.lora_overrides(),
            *([f"optim.lr={run.lr}"] if run.lr is not None else []),  # after lora.yaml's: the setting's own
        ]

    def sweep_overrides(self, prepared: Prepared, runs: list[Run]) -> list[str]:
        """The ``recall-dist sweep`` overrides (on top of ``CONFIG_DIR/sweep.yaml``)."""
        models = "[" + ", ".join(r.model_entry(self.out / "runs" / r.name / "final") for r in runs) + "]"
        return [
            f"models={models}",
            f"output_dir={self.out}",
            f"temperatures=[{', '.join(f'{t:g}' for t in self.temperatures)}]",
            *prepared.sweep,
        ]


# ---------------------------------------------------------------------------------------------
# The skeleton


def run_pipeline(recipe: Recipe, resume: bool = False) -> Path:
    """Prepare, fine-tune every ``Run`` of ``recipe``, sweep them, report; return the report's path.
    ``resume``: keep the fine-tunes an earlier, interrupted call finished (``finished_run``) and train
    only the others; without it every model is trained afresh into an empty directory."""
    runs = recipe.runs()
    progress = Progress(recipe.prepare_stages() + len(runs) + 1)
    print(recipe.banner(), flush=True)
    if recipe.lora:
        print(f"LoRA adapters on every fine-tune: {' '.join(recipe.lora_overrides())}", flush=True)
    prepared = recipe.prepare(progress, resume)
    for run in runs:
        run_dir = recipe.out / "runs" / run.name
        progress.train(
            f"fine-tune {run.name} ({recipe.steps_of(run)} steps)",
            recipe.CONFIG_DIR / "finetune.yaml",
            recipe.finetune_overrides(prepared, run, run_dir),
            run_dir,
            recipe.steps_of(run),
            resume,
            key=f"fine-tune {run.name}",
        )
    sweep = recipe.sweep_overrides(prepared, runs)
    progress.times["sweep"] = progress.stage(
        recipe.sweep_label(len(runs)),
        ["sweep", str(recipe.CONFIG_DIR / "sweep.yaml"), *sweep],
        recipe.out / "logs" / "sweep.log",
    )
    wall = progress.elapsed()
    report = recipe.report(Result(prepared, sweep, wall, progress.times))
    print(f"{recipe.COMMAND} done in {fmt_time(wall)}: {report}", flush=True)
    return report


class Progress:
    """The numbered stages of one demo call: ``[k/total]`` labels, the call's clock, the stage times."""

    def __init__(self, total: int):
        self.start = time.monotonic()
        self.labels = iter(f"[{k}/{total}]" for k in range(1, total + 1))
        self.times: dict[str, float | None] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def next_label(self) -> str:
        """The label of the next stage, for a stage that runs in this process (and prints its own line)."""
        return next(self.labels)

    def stage(self, what: str, args: list[str], log: Path, run_dir: Path | None = None) -> float:
        """Run the next stage: ``recall-dist ARGS`` on 2 processes (``stages.run_stage``); its seconds."""
        return run_stage(self.next_label(), what, args, log, self.start, run_dir)

    def train(
        self, what: str, config: Path, overrides: list[str], run_dir: Path, steps: int, resume: bool, key: str
    ) -> None:
        """The next stage, a ``recall-dist train`` into ``run_dir``: reused when ``resume`` and it finished
        earlier (its time recorded as None), else trained from scratch into an emptied ``run_dir``."""
        if resume and finished_run(run_dir, config, overrides, steps):
            print(f"{self.next_label()} {what}: finished earlier, reused ({run_dir / 'final'})", flush=True)
            self.times[key] = None
            return
        shutil.rmtree(run_dir, ignore_errors=True)  # a run directory belongs to its run
        log = run_dir.parent.parent / "logs" / f"{run_dir.name}.log"
        self.times[key] = self.stage(what, ["train", str(config), *overrides], log, run_dir)


def finished_run(run_dir: Path, config: Path, overrides: list[str], steps: int) -> bool:
    """True when ``run_dir`` holds this very training run (``config`` + ``overrides``), finished: an
    exported ``final/``, a complete checkpoint at step ``steps``, and that checkpoint's experiment
    fingerprint (model, loss, optimizer, data: ``train/rundir/experiment.py``) equal to the one these
    overrides give, and the same ``train.seed``.  Anything else (a different model or loss, fewer steps,
    a run killed before its export) is not reused."""
    from recall_dist.configtree import to_dict
    from recall_dist.train.config import load_train_config
    from recall_dist.train.rundir.checkpointer import checkpoint_step, latest_checkpoint
    from recall_dist.train.rundir.experiment import config_fingerprint, fingerprint_differences, read_fingerprint

    newest = latest_checkpoint(run_dir / "checkpoints")
    if not (run_dir / "final" / "config.json").is_file() or newest is None or checkpoint_step(newest) != steps:
        return False
    cfg = load_train_config(config, overrides)
    try:
        saved = read_fingerprint(newest)
        saved_seed = load_yaml(newest / "config.yaml")["train"]["seed"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return not fingerprint_differences(saved, config_fingerprint(to_dict(cfg))) and saved_seed == cfg.train.seed


# ---------------------------------------------------------------------------------------------
# The command line every demo shares.


def add_common_arguments(p, recipe_cls: type[Recipe], quick_help: str) -> None:
    """--out, --seeds, --steps, --quick, --resume: the options of every demo."""
    p.add_argument("--out", default=None, help=f"output directory (default: {recipe_cls.OUT})")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per loss (default: 1)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="fine-tuning steps per loss (default: the demo's config; a loss that sets its own steps keeps them)",
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument(
        "--resume",
        action="store_true",
        help="after an interrupted call: reuse the fine-tunes it finished (same model, loss, data, steps, seed) "
        "and train only the rest (default: every model is trained afresh)",
    )


def recipe_from_args(recipe_cls: type[Recipe], args, sizes: tuple = ()) -> Recipe | str:
    """The recipe the common options (and the demo's ``sizes``: (field, flag, value) triples) ask for,
    or the message of the first option out of range."""
    recipe = recipe_cls.quick() if args.quick else recipe_cls.full()
    for key, flag, value in (("finetune_steps", "--steps", args.steps), *sizes, ("seeds", "--seeds", args.seeds)):
        if value is not None:
            if value < 1:
                return f"{flag} = {value}: must be >= 1"
            setattr(recipe, key, value)
    if args.out is not None:
        recipe.out = Path(args.out)
    recipe.out = recipe.out.resolve()
    return recipe


def run_command(recipe: Recipe, resume: bool) -> int:
    """``run_pipeline`` with its errors on stderr: exit 0 or 1."""
    try:
        run_pipeline(recipe, resume)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"recall-dist {recipe.COMMAND}: error: {e}", file=sys.stderr)
        return 1
    return 0


def pretrained_lm_main(recipe_cls: type[Recipe], description: str, quick_help: str, argv: list[str] | None) -> int:
    """The CLI of a demo that fine-tunes a pretrained LM: the common options plus ``--model`` (a local
    directory is passed on by its absolute path, since the stages run in the package's directory)."""
    p = argparse.ArgumentParser(
        prog=f"recall-dist {recipe_cls.COMMAND}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(p, recipe_cls, quick_help)
    p.add_argument("--model", default=None, help="causal LM directory or hub name (default: SmolLM2-135M-Instruct)")
    lora_config = recipe_cls.CONFIG_DIR / LORA_CONFIG
    if lora_config.is_file():
        p.add_argument(
            "--lora",
            action="store_true",
            help=f"fine-tune LoRA adapters instead of every weight ({' '.join(config_overrides(lora_config))}); "
            f"default output {recipe_cls.OUT}-lora",
        )
    args = p.parse_args(argv)
    recipe = recipe_from_args(recipe_cls, args)
    if isinstance(recipe, str):
        print(f"recall-dist {recipe_cls.COMMAND}: {recipe}", file=sys.stderr)
        return 2
    if getattr(args, "lora", False):
        recipe.lora = True
        if args.out is None:  # next to the full fine-tunes' results, not over them
            recipe.out = Path(f"{recipe_cls.OUT}-lora").resolve()
    recipe.model = str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model
    return run_command(recipe, args.resume)
