"""The loss math: weight rules (one place per formula), their registry, and ``build_loss``."""

from recall_dist.losses.base import (
    LossParamError,
    RecallLoss,
    TokenBatch,
    WeightRule,
    build_loss,
    known_rules,
    register_rule,
)
from recall_dist.losses.prob_rules import DFT, ProbPower, ProbThreshold
from recall_dist.losses.rules import NLL, CDiv, LambdaPR
from recall_dist.losses.truncation import TruncP, TruncR

__all__ = [
    "DFT",
    "NLL",
    "CDiv",
    "LambdaPR",
    "LossParamError",
    "ProbPower",
    "ProbThreshold",
    "RecallLoss",
    "TokenBatch",
    "TruncP",
    "TruncR",
    "WeightRule",
    "build_loss",
    "known_rules",
    "register_rule",
]
