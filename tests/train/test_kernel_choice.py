"""The kernel choice a run used is the one its records name: the ``RECALL_DIST_*`` variables are read
once, when ``run_training`` starts; the saved config (``config.yaml`` of each checkpoint) and the metrics
header say what was resolved; a variable changed after the start changes nothing; and the experiment
fingerprint leaves the kernel keys out (``train/rundir/experiment.py``)."""

from __future__ import annotations

import json

import pytest

from recall_dist.configtree import load_yaml, to_dict
from recall_dist.distributed.testing import run_distributed_test
from recall_dist.parallel.options import KernelOptions
from recall_dist.train.metrics_log import read_headers, read_metrics
from recall_dist.train.rundir.experiment import config_fingerprint
from tests.train.helpers import build, tiny_config_dict

# What the start resolves: the config says auto / triton, the environment overrides both.
START_ENV = {"RECALL_DIST_KERNEL": "torch", "RECALL_DIST_HEAD_MATMUL": "cublas"}
RESOLVED = KernelOptions(kernel="torch", head_schedule="recompute", head_matmul="cublas")
# Set after the first step: a head that read the environment again would raise on these.
LATER_ENV = {"RECALL_DIST_KERNEL": "fast", "RECALL_DIST_HEAD_MATMUL": "cutlass"}


def _worker(data: dict, seen_path: str) -> None:
    import os

    import torch.distributed as dist

    from recall_dist.train import loss_head
    from recall_dist.train.trainer import run_training

    seen = []
    real = loss_head.fused_linear_loss

    def spy(*args, **kwargs):  # the real kernel runs; the spy notes the options the head passed it
        seen.append(kwargs["kernel"])
        return real(*args, **kwargs)

    loss_head.fused_linear_loss = spy
    os.environ.update(START_ENV)

    def change_env(path, step):
        if step == 1:
            os.environ.update(LATER_ENV)

    try:
        run_training(build(data), on_checkpoint=change_env)
    finally:
        for name in START_ENV:
            os.environ.pop(name, None)
    if dist.get_rank() == 0:
        with open(seen_path, "w") as f:
            json.dump([to_dict(options) for options in seen], f)


@pytest.mark.slow
def test_the_run_records_and_keeps_the_kernel_resolved_at_its_start(tmp_path):
    out = tmp_path / "run"
    data = tiny_config_dict(out, backend={"name": "fsdp2"}, train={"max_steps": 3, "checkpoint_every": 1})
    seen_path = tmp_path / "seen.json"
    run_distributed_test(_worker, 2, data, str(seen_path))

    resolved = to_dict(RESOLVED)
    seen = json.loads(seen_path.read_text())
    assert len(seen) == 3 and all(options == resolved for options in seen), seen  # steps 2-3 ran after LATER_ENV
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert read_headers(out) == [{"start_step": 0, "kernel": resolved}]
    first_line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first_line == {"header": {"start_step": 0, "kernel": resolved}}
    for step in (2, 3):  # saved before and after the variables changed: the choice the run made
        checkpoint = out / "checkpoints" / f"step_{step:08d}"
        saved = load_yaml(checkpoint / "config.yaml")["loss"]
        assert {key: saved[key] for key in resolved} == resolved
        # the fingerprint is that of the config as written, kernel keys or not
        fingerprint = json.loads((checkpoint / "fingerprint.json").read_text())
        assert fingerprint == config_fingerprint(to_dict(build(data)))
        assert not any(key.startswith(("loss.kernel", "loss.head_", "loss.triton")) for key in fingerprint["keys"])
