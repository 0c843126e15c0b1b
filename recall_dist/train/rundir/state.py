"""A rank's trainer state in a checkpoint as plain data: ``trainer_rankNNNNN.json`` (step, data position,
RNG states, loss state) and ``trainer_rankNNNNN.tensors.pt`` (its tensors, loaded with ``weights_only``).

Loading never runs code from the file: a tensors file holding other pickled objects is refused
(``UnsafeCheckpoint``).  ``rng_state`` / ``set_rng_state``: Python's, NumPy's, torch's (and CUDA's) RNGs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from recall_dist.train.rundir.errors import CheckpointError, UnsafeCheckpoint


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _encode(obj, tensors: dict, path: str):
    """JSON-able copy of ``obj``; tensors and numpy arrays go to ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iu" else obj.copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"trainer state {path or '<root>'}: dict keys must be strings, got {list(obj)!r}")
        return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state {path}: {type(obj).__name__} is not plain data (JSON values or tensors)")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _state_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"trainer_rank{rank:05d}.json", directory / f"trainer_rank{rank:05d}.tensors.pt"


def write_trainer_state(directory: str | Path, rank: int, state: dict) -> None:
    tensors: dict = {}
    plain = _encode(state, tensors, "")
    json_path, tensor_path = _state_files(Path(directory), rank)
    torch.save(tensors, tensor_path)
    json_path.write_text(json.dumps(plain, indent=1))


def read_trainer_state(directory: str | Path, rank: int) -> dict:
    """This rank's trainer state (rank 0's when the checkpoint was written by fewer ranks: the data
    position and the loss buffer are identical on every rank)."""
    directory = Path(directory)
    json_path, tensor_path = _state_files(directory, rank)
    if not json_path.is_file():
        json_path, tensor_path = _state_files(directory, 0)
    if not json_path.is_file():
        raise CheckpointError(f"{directory}: no trainer state ({json_path.name})")
    try:
        tensors = torch.load(tensor_path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises UnpicklingError or RuntimeError, depending on the payload
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise UnsafeCheckpoint(
                f"{tensor_path}: refused: it holds pickled objects other than tensors, and loading them "
                f"could run code from the file (recall_dist writes only tensors there).  Details: "
                f"{str(e).splitlines()[0]}"
            ) from None
        raise CheckpointError(f"{tensor_path}: unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UnsafeCheckpoint(f"{tensor_path}: refused: expected a dict of tensors, got {type(tensors).__name__}")
    return _decode(json.loads(json_path.read_text()), tensors)
