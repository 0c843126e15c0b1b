"""Config errors stop ``recall-dist train`` before anything is written: unknown loss, bad alpha,
missing dataset file, tokenizer/model vocabulary mismatch -- each names the key, exits non-zero,
and leaves an existing output directory byte-for-byte as it was."""

from __future__ import annotations

import pytest
import yaml

from recall_dist.configtree import ConfigError, to_dict
from recall_dist.train import cli
from recall_dist.train.config import load_train_config
from tests.train.helpers import tiny_config_dict

CASES = [
    (["loss.name=cdvi"], ["loss.name", "'cdvi'", "cdiv", "lambda_pr", "nll", "truncr"]),
    (["loss.params.alpha=-1"], ["loss.params.alpha", "alpha"]),
    (
        ["data.source=/nonexistent/train.jsonl", "data.task_params={}"],
        ["data.source", "/nonexistent/train.jsonl", "not found"],
    ),
    (["model.config.vocab_size=8"], ["model.config.vocab_size", "vocabulary mismatch", "13"]),
]


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overrides,expected", CASES, ids=["unknown-loss", "bad-alpha", "missing-data", "vocab"])
def test_config_error_exits_nonzero_names_key_and_writes_nothing(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "checkpoints").mkdir()
    before = _snapshot(out)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(out)))
    code = cli.main([str(config), *overrides])
    err = capsys.readouterr().err
    assert code != 0
    assert "config error" in err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_shipped_configs_load_with_the_paper_setting():
    for name, rule in [("nll", "nll"), ("cdiv", "cdiv"), ("truncr", "truncr"), ("lambda_pr", "lambda_pr")]:
        cfg = load_train_config(f"configs/{name}.yaml")
        assert cfg.loss.name == rule
        assert (cfg.optim.name, cfg.optim.lr, cfg.train.global_batch_size, cfg.train.epochs) == ("adam", 1e-6, 8, 3)
        assert cfg.model.config["hidden_size"] == 4096  # llama2-7b by default
    assert load_train_config("configs/cdiv.yaml").loss.params["alpha"] == 1.4
    assert load_train_config("configs/cdiv.yaml", ["model=llama2-13b"]).model.config["hidden_size"] == 5120
    assert load_train_config("configs/tiny_cpu.yaml").backend.name == "deepspeed"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["backend.name=megatron"], "backend.name"),
        (["backend.zero_stage=1"], "backend.zero_stage"),
        (["optim.lr=0"], "optim.lr"),
        (["train.resume=/no/such/checkpoint"], "train.resume"),
        (["model=llama3"], "model"),
    ],
)
def test_other_bad_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_train_config("configs/tiny_cpu.yaml", overrides)
    assert str(err.value).startswith(key), str(err.value)


def test_global_batch_must_split_over_ranks():
    cfg = load_train_config("configs/cdiv.yaml", ["train.global_batch_size=8", "train.micro_batch_size=1"])
    assert cfg.train.accumulation_steps(8) == 1 and cfg.train.accumulation_steps(2) == 4
    with pytest.raises(ConfigError, match=r"train.global_batch_size"):
        cfg.train.accumulation_steps(3)


def test_override_numbers_and_the_key_a_loss_error_names():
    """`optim.lr=1e-4` on the command line is a number (YAML 1.1 would read a string); a loss
    parameter error names the parameter at fault, as the rule that owns it reports it."""
    assert load_train_config("configs/tiny_cpu.yaml", ["optim.lr=1e-4"]).optim.lr == 1e-4
    for overrides, key in [
        (["loss.name=cdiv", "loss.params={alpha: 1.4, beta: 2}"], "loss.params.beta"),
        (["loss.name=truncr", "loss.params={buffer_size: 8, min_count: 9}"], "loss.params.min_count"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_train_config("configs/tiny_cpu.yaml", overrides)
        assert str(info.value).startswith(f"{key}:"), str(info.value)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_sweep_temperatures_must_be_finite(bad):
    from recall_dist.configtree import from_dict
    from recall_dist.eval import SweepConfig

    data = {"models": [{"name": "m", "path": "."}], "temperatures": [0.5, bad]}
    with pytest.raises(ConfigError, match=r"temperatures\[1\]: expected a finite number"):
        from_dict(SweepConfig, data)


# ---------------------------------------------------------------- the loss head's kernel keys (docs/kernels.md)

KERNEL_ENV = ("RECALL_DIST_KERNEL", "RECALL_DIST_HEAD_SCHEDULE", "RECALL_DIST_HEAD_MATMUL", "RECALL_DIST_TRITON_TILES")


@pytest.fixture
def no_kernel_env(monkeypatch):
    for name in KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "override,expected",
    [
        ("loss.kernel=cuda", "loss.kernel: 'cuda' is not allowed; allowed: auto, torch, triton"),
        ("loss.head_schedule=twice", "loss.head_schedule: 'twice' is not allowed; allowed: recompute, single"),
        ("loss.head_matmul=cutlass", "loss.head_matmul: 'cutlass' is not allowed; allowed: triton, cublas"),
        ("loss.triton_tiles=[128,128,64]", "loss.triton_tiles: [128, 128, 64] is not allowed; allowed: null"),
        ("loss.triton_tiles=[100,128,64,8,3,16]", "block sizes powers of 2"),
    ],
)
def test_kernel_keys_are_validated_with_the_config(no_kernel_env, override, expected):
    with pytest.raises(ConfigError) as info:
        load_train_config("configs/tiny_cpu.yaml", [override])
    assert str(info.value).startswith(override.split("=")[0] + ":") and expected in str(info.value), str(info.value)


def test_kernel_keys_defaults_and_env_overrides(no_kernel_env):
    """Building a config reads no environment; ``with_environment`` (a run's start) puts the variables that
    are set into the kernel keys, so the config a run saves says what it ran."""
    from recall_dist.parallel import KernelOptions

    cfg = load_train_config("configs/tiny_cpu.yaml")
    assert (cfg.loss.kernel, cfg.loss.head_schedule, cfg.loss.head_matmul, cfg.loss.triton_tiles) == (
        "auto",
        "recompute",
        "triton",
        None,
    )
    keys = ["loss.kernel=torch", "loss.head_matmul=cublas", "loss.triton_tiles=[64,64,32,4,2,8]"]
    cfg = load_train_config("configs/tiny_cpu.yaml", keys)
    assert cfg.loss.kernel_options() == KernelOptions("torch", "recompute", "cublas", (64, 64, 32, 4, 2, 8))
    # a variable that is set wins over its key; the others keep the config's value
    no_kernel_env.setenv("RECALL_DIST_KERNEL", "triton")
    no_kernel_env.setenv("RECALL_DIST_TRITON_TILES", "128,128,64,8,3,16")
    no_kernel_env.setenv("RECALL_DIST_HEAD_SCHEDULE", "")  # empty: not set
    assert load_train_config("configs/tiny_cpu.yaml", keys).loss.kernel == "torch"  # not read when built
    resolved = cfg.with_environment()
    assert resolved.loss.kernel_options() == KernelOptions("triton", "recompute", "cublas", (128, 128, 64, 8, 3, 16))
    assert to_dict(resolved.loss) == to_dict(cfg.loss) | {"kernel": "triton", "triton_tiles": [128, 128, 64, 8, 3, 16]}
    assert cfg.loss.kernel == "torch" and resolved.model is cfg.model  # a new config; the given one stands
    assert cfg.with_environment({}).loss.kernel_options() == cfg.loss.kernel_options()
    # a bad override stops the run's start, naming the variable, the key it overrides and the allowed values
    no_kernel_env.setenv("RECALL_DIST_HEAD_MATMUL", "cutlass")
    with pytest.raises(ConfigError) as info:
        cfg.with_environment()
    message = str(info.value)
    assert message.startswith("loss.head_matmul: $RECALL_DIST_HEAD_MATMUL='cutlass'") and "triton, cublas" in message


def test_check_reports_a_bad_kernel_variable(tmp_path, no_kernel_env, capsys):
    """``recall-dist train --check`` resolves the variables as a run's start does."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "run")))
    no_kernel_env.setenv("RECALL_DIST_KERNEL", "cuda")
    assert cli.main(["--check", str(config)]) != 0
    assert "loss.kernel: $RECALL_DIST_KERNEL='cuda'" in capsys.readouterr().err


def test_build_makes_a_new_loss_each_call():
    """Two callers of ``LossConfig.build()`` never share a loss: TruncR's quantile buffer is its own
    (the old ``build()`` returned the one loss built during validation)."""
    import torch

    from recall_dist import vocab_parallel_loss
    from recall_dist.losses import TruncR

    def pushed(loss) -> int:
        buffer = loss.state_dict()["state"]["buffer"]
        return 0 if buffer is None else buffer["total_pushed"]

    overrides = ["loss.name=truncr", "loss.params={drop: 0.5, buffer_size: 16, min_count: 1, granularity: token}"]
    cfg = load_train_config("configs/tiny_cpu.yaml", overrides)
    first, second = cfg.loss.build(), cfg.loss.build()
    assert first is not second and isinstance(first.rule, TruncR) and first.rule is not second.rule
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    vocab_parallel_loss(logits, target, first, kernel="torch")  # one call: its 6 token values enter the buffer
    assert pushed(first) == 6 and pushed(second) == 0 == pushed(cfg.loss.build())
