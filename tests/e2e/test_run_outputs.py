"""What a finished ``recall-dist train`` run leaves, from real tiny runs (FSDP2, one CPU process):

- ``train.final_checkpoint: false`` writes no checkpoint of the last step, says so in the log, and a later
  start in the same output_dir is refused with nothing touched; ``train.overwrite`` moves the run, final/
  included, aside and starts over;
- final/ carries the pretrained base's generation_config.json (stop ids, chat sampling defaults);
- ``backend.bf16: auto`` is saved as this machine's answer in the checkpoint's config.yaml;
- metrics.jsonl has the step time, trained and input tokens/s and the weight diagnostics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recall_dist.distributed.testing import run_distributed_test
from tests.train.helpers import build, tiny_config_dict

pytestmark = pytest.mark.slow


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_base_model(directory: Path) -> Path:
    """A tiny pretrained Llama directory (weights, tokenizer) with a generation_config.json of its own."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from recall_dist.data import load_tokenizer

    cfg = build(tiny_config_dict(directory / "unused"))
    model = AutoModelForCausalLM.from_config(cfg.model.hf_config())
    model.save_pretrained(directory)
    load_tokenizer("char:product").save_pretrained(directory)
    GenerationConfig(
        bos_token_id=1, eos_token_id=[2, 5], pad_token_id=0, do_sample=True, temperature=0.7
    ).save_pretrained(directory)
    return directory


def _config(out: Path, base: Path, **train) -> dict:
    return tiny_config_dict(
        out,
        model={"name_or_path": str(base), "attn_implementation": "sdpa"},
        backend={"name": "fsdp2", "bf16": "auto"},
        loss={"name": "cdiv", "params": {"alpha": 2.0}},
        train={"max_steps": 3, "checkpoint_every": 2, "export_final": True, "final_checkpoint": False, **train},
    )


def _no_final_checkpoint_worker(out: str, base: str) -> None:
    import yaml
    from transformers import AutoModelForCausalLM

    from recall_dist.train.metrics_log import read_metrics
    from recall_dist.train.precision import native_bf16
    from recall_dist.train.rundir import NO_FINAL_CHECKPOINT, PREVIOUS_RUNS, RunDirError, complete_checkpoints
    from recall_dist.train.trainer import run_training

    out, base = Path(out), Path(base)
    data = _config(out, base)
    assert run_training(build(data))["step"] == 3
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_00000002"]  # none of step 3
    assert json.loads((out / NO_FINAL_CHECKPOINT).read_text())["step"] == 3
    saved = yaml.safe_load((out / "checkpoints" / "step_00000002" / "config.yaml").read_text())
    assert saved["backend"]["bf16"] is native_bf16("cpu")[0]  # auto, as it ran

    generation = json.loads((out / "final" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 5] and generation["temperature"] == 0.7 and generation["do_sample"]
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    assert exported.generation_config.eos_token_id == [2, 5]  # generate() stops where the base's does

    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["trained_tokens_per_s"] * r["step_seconds"] == pytest.approx(r["tokens"], rel=1e-9)
        assert r["input_tokens_per_s"] == r["tokens_per_s"] >= r["trained_tokens_per_s"] > 0
        assert 0 < r["ess_fraction"] < 1 and r["weight_max_over_mean"] > 1 and 0.01 < r["top1pct_share"] < 1
        assert math.isclose(r["ess_fraction"], r["ess"] / r["tokens"], rel_tol=1e-12)

    before = _files(out)
    for again in (data, _config(out, base, resume=str(out / "checkpoints" / "step_00000002"))):
        with pytest.raises(RunDirError, match=r"finished run without a checkpoint of its last step"):
            run_training(build(again))
    assert _files(out) == before, "a refused start changed the output_dir"

    fresh = _config(out, base, overwrite=True, checkpoint_every=0, max_steps=2)
    assert run_training(build(fresh))["step"] == 2
    (moved,) = (out / PREVIOUS_RUNS).iterdir()
    assert {k: v for k, v in _files(moved).items() if k != "MOVED_HERE"} == before, "the finished run was not kept"
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # checkpoint_every 0
    assert (out / "final" / "model.safetensors").is_file() and (out / NO_FINAL_CHECKPOINT).is_file()


def test_a_run_without_a_final_checkpoint_exports_and_is_never_continued(tmp_path, capfd):
    base = write_base_model(tmp_path / "base")
    run_distributed_test(_no_final_checkpoint_worker, 1, str(tmp_path / "run"), str(base))
    err = capfd.readouterr().err
    assert "train.final_checkpoint=false: no checkpoint of the last step 3 (latest: " in err
    assert "This run cannot be resumed or extended" in err
    assert "backend.bf16=auto: " in err and " compute (" in err
