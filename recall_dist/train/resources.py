"""The checks of a training config that need files (``validate_resources``): the data sources, the model and
tokenizer paths, the tokenizer itself and the model's vocabulary.  The running code calls them (the trainer,
``recall-dist train --check``) before anything is written; the config tree (``train/config.py``) only
checks values.
"""

from __future__ import annotations

from recall_dist.configtree import ConfigError
from recall_dist.data.chat import set_chat_template
from recall_dist.data.sources import local_path
from recall_dist.data.tokenizer import load_tokenizer
from recall_dist.train.config import TrainConfig
from recall_dist.train.lora import check_quantize_supported
from recall_dist.train.models import check_model_path, first_line


def validate_resources(cfg: TrainConfig):
    """Checks that need files: the data sources exist, the model and tokenizer paths exist or are hub
    names, the tokenizer loads (with ``data.chat_template`` set), and the model's vocabulary covers the
    tokenizer's.  Returns the tokenizer.  Raises ``ConfigError`` before anything is written."""
    for data in (cfg.data, cfg.data.eval_config()):
        if data is not None and not data.is_synthetic:
            local_path(data.source, data.source_key)
    check_quantize_supported(cfg.model.lora, cfg.backend)  # QLoRA: bitsandbytes, not ZeRO-3; one line
    if cfg.model.name_or_path is not None:
        check_model_path(cfg.model.name_or_path)
    tokenizer_key = "model.tokenizer" if cfg.model.tokenizer is not None else "model.name_or_path"
    if not cfg.model.tokenizer_name.startswith("char:"):
        check_model_path(cfg.model.tokenizer_name, tokenizer_key)
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer_name)
    except (OSError, ValueError) as e:
        raise ConfigError(tokenizer_key, f"{cfg.model.tokenizer_name!r}: {e}") from None
    set_chat_template(tokenizer, cfg.data.chat_template)
    try:
        model_vocab = cfg.model.hf_config().vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError(
            "model.name_or_path",
            f"{cfg.model.name_or_path!r}: cannot read the model's config.json (not a model directory, or a hub "
            f"model that cannot be reached: offline?): {first_line(e)}",
        ) from None
    if model_vocab < len(tokenizer):
        key = "model.config.vocab_size" if cfg.model.config is not None else "model.name_or_path"
        raise ConfigError(
            key,
            f"vocabulary mismatch: the model has {model_vocab} output tokens but tokenizer "
            f"{cfg.model.tokenizer_name!r} has {len(tokenizer)}; the model vocabulary must be "
            f">= the tokenizer's (set model.config.vocab_size: {len(tokenizer)})",
        )
    return tokenizer
