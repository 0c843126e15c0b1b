"""Presets shipped with the package (so a non-editable install finds them): Hugging Face model
architectures (``models/*.yaml``, named by ``model: <name>`` in a training config) and DeepSpeed JSON
(``deepspeed/*.json``).  In a source checkout ``configs/models`` and ``configs/deepspeed`` link here."""

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
MODEL_PRESET_DIR = PRESET_DIR / "models"
DEEPSPEED_CONFIG_DIR = PRESET_DIR / "deepspeed"
