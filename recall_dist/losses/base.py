"""The loss family's shape: every loss is a weighted NLL with detached weights,

    L = sum_n w_n * l_n / Z,    w_n = stop_gradient(rule(...)),    Z = stop_gradient(sum_n w_n),

so a loss is fully described by its weight rule (``WeightRule``).  ``RecallLoss`` adds what every
rule shares (``max_weight`` clipping, ``nll_mix``, the normaliser) and turns global sums into the
per-token coefficients the parallel kernels apply.  Rules register by name; the kernels never
branch on which rule runs (Liger's chunked-loss pattern: the base owns the machinery).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

_RULES: dict[str, type[WeightRule]] = {}


@dataclass
class TokenBatch:
    """Detached per-token statistics a rule sees.

    nll:          [n] float64, NLL of the valid (non-ignored) tokens, identical on every TP rank.
    sequence_ids: [n] long or None, tokens with equal id belong to the same sequence.
    dp_group:     the data-parallel group; stateful rules gather over it (``None`` = not distributed).
    """

    nll: torch.Tensor
    sequence_ids: torch.Tensor | None
    dp_group: Any = None


class WeightRule(ABC):
    """A weight rule: ``weights(batch) -> [n] float64 >= 0`` from detached token statistics.

    Subclasses set ``name`` and implement ``weights``; ``per_token = True`` promises that a token's
    weight depends only on its own NLL (so the fused kernel may form gradients chunk by chunk in
    the forward pass).  Rules with state (a rolling buffer) implement ``state_dict`` /
    ``load_state_dict`` and report extra statistics (e.g. ``tau``) through ``extra_stats``.
    """

    name: ClassVar[str] = ""
    per_token: ClassVar[bool] = True

    @abstractmethod
    def weights(self, batch: TokenBatch) -> torch.Tensor:
        """[n] float64 weights >= 0 for the tokens of ``batch`` (detached)."""

    def divergence(self, nll: torch.Tensor) -> torch.Tensor | None:
        """Per-token divergence value whose gradient this rule's weighted NLL follows, if any."""
        return None

    def extra_stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:  # noqa: B027 - stateless rules keep this no-op
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def register_rule(name: str) -> Callable[[type[WeightRule]], type[WeightRule]]:
    """Class decorator: make a ``WeightRule`` subclass available to ``build_loss(name, ...)``."""

    def deco(cls: type[WeightRule]) -> type[WeightRule]:
        if not (isinstance(cls, type) and issubclass(cls, WeightRule)):
            raise TypeError(f"register_rule({name!r}) expects a WeightRule subclass, got {cls!r}")
        if name in _RULES and _RULES[name] is not cls:
            raise ValueError(f"a weight rule named {name!r} is already registered ({_RULES[name].__name__})")
        cls.name = name
        _RULES[name] = cls
        return cls

    return deco


def known_rules() -> list[str]:
    return sorted(_RULES)


class RecallLoss:
    """A weight rule plus the options every rule shares.

    max_weight: clip w_n to at most this value (None = no clipping).
    nll_mix:    m in [0, 1]; the objective is (1 - m) * L_rule + m * L_nll (a convex mix of losses).
    normalize:  "weights" (Z = global sum of weights, the default) or "tokens" (Z = global count
                of valid tokens).
    """

    def __init__(
        self, rule: WeightRule, *, max_weight: float | None = None, nll_mix: float = 0.0, normalize: str = "weights"
    ):
        if max_weight is not None and not (float(max_weight) > 0):
            raise ValueError(f"max_weight must be > 0 (or None), got {max_weight!r}")
        if not 0.0 <= float(nll_mix) <= 1.0:
            raise ValueError(f"nll_mix must be in [0, 1], got {nll_mix!r}")
        if normalize not in ("weights", "tokens"):
            raise ValueError(f"normalize must be 'weights' or 'tokens', got {normalize!r}")
        self.rule = rule
        self.max_weight = None if max_weight is None else float(max_weight)
        self.nll_mix = float(nll_mix)
        self.normalize = normalize

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def single_pass(self) -> bool:
        """Weights known chunk by chunk and one global scale: gradients can be formed in forward."""
        return self.rule.per_token and self.nll_mix == 0.0

    def token_weights(self, batch: TokenBatch) -> torch.Tensor:
        w = self.rule.weights(batch).to(torch.float64)
        if self.max_weight is not None:
            w = w.clamp(max=self.max_weight)
        return w

    def coefficients(self, sum_w: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global scalars (A, B) such that the objective is sum_n (A w_n + B) l_n.

        A zero normaliser (all tokens ignored, or every weight zero) gives a zero coefficient, never
        a division by zero.
        """
        z = sum_w if self.normalize == "weights" else count
        inv_z = torch.where(z > 0, 1.0 / z.clamp_min(1e-300), torch.zeros_like(z))
        inv_n = torch.where(count > 0, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))
        return (1.0 - self.nll_mix) * inv_z, self.nll_mix * inv_n

    def state_dict(self) -> dict:
        return {"rule": self.name, "state": self.rule.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("rule") != self.name:
            raise ValueError(f"loss state is for rule {sd.get('rule')!r}, this loss is {self.name!r}")
        self.rule.load_state_dict(sd["state"])

    def __repr__(self) -> str:
        return (
            f"RecallLoss({self.rule!r}, max_weight={self.max_weight}, nll_mix={self.nll_mix}, "
            f"normalize={self.normalize!r})"
        )


_SHARED = ("max_weight", "nll_mix", "normalize")


def build_loss(name: str, **params: Any) -> RecallLoss:
    """Build a loss by rule name: ``build_loss("cdiv", alpha=1.4)``, ``build_loss("truncr", drop=0.3)``.

    Shared options for every rule: ``max_weight``, ``nll_mix``, ``normalize``.  Unknown names or
    parameters raise ``ValueError`` naming them and what is allowed.
    """
    if name not in _RULES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(known_rules())}")
    cls = _RULES[name]
    shared = {k: params.pop(k) for k in _SHARED if k in params}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown parameter {unknown[0]!r}; allowed: {', '.join(allowed + list(_SHARED))}")
    return RecallLoss(cls(**params), **shared)
