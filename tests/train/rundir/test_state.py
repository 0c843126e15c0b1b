"""recall_dist/train/rundir/state.py: the trainer state is plain JSON + tensors and restores every RNG;
a state file in another format (a pickle) is not loaded."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from recall_dist.train.rundir.errors import CheckpointError
from recall_dist.train.rundir.state import read_trainer_state, rng_state, set_rng_state, write_trainer_state


def test_trainer_state_is_plain_json_and_tensors_and_restores_every_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"step": 7, "rng": rng_state(), "loss": {"rule": "truncr", "state": {"tau": None, "v": torch.ones(3)}}}
    write_trainer_state(tmp_path, 0, state)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    plain = json.loads((tmp_path / "trainer_rank00000.json").read_text())  # JSON: no code can hide in it
    assert plain["loss"]["state"]["v"] == {"__tensor__": "loss.state.v"} and plain["step"] == 7
    back = read_trainer_state(tmp_path, 3)  # a rank the checkpoint does not have: rank 0's state
    torch.testing.assert_close(back["loss"]["state"]["v"], torch.ones(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    torch.testing.assert_close(torch.rand(2), expected[2], rtol=0, atol=0)


def test_a_pickled_state_file_is_not_loaded(tmp_path):
    torch.save({"rng": {"numpy": np.random.get_state()}}, tmp_path / "trainer_rank00000.pt")
    with pytest.raises(CheckpointError, match=r"no trainer state \(trainer_rank00000\.json\)"):
        read_trainer_state(tmp_path, 0)
