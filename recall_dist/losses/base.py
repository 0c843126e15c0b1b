"""The loss family's shape: every loss is a weighted NLL with detached weights,

    L = sum_n w_n * l_n / Z,    w_n = stop_gradient(rule(...)),    Z = stop_gradient(sum_n w_n),

so a loss is fully described by its weight rule (``WeightRule``).  ``RecallLoss`` adds what every
rule shares (``max_weight`` clipping, ``nll_mix``, the normaliser) and turns global sums into the
per-token coefficients the parallel kernels apply.  Rules register by name; the kernels never
branch on which rule runs (Liger's chunked-loss pattern: the base owns the machinery).
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from recall_dist.losses.accumulator import StepAccumulator, inverse_or_zero, stats_from_sums

_RULES: dict[str, type[WeightRule]] = {}


class LossParamError(ValueError):
    """A loss parameter is invalid; ``param`` names it (``alpha``, ``min_count``, ...) so that a config
    error can point at ``loss.params.<param>`` without parsing the message."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


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

    def begin_step(self) -> None:  # noqa: B027 - per-token rules have no step state
        """An optimizer step starts: its calls of ``weights`` share what is fixed here (a threshold)."""

    def end_step(self) -> None:  # noqa: B027 - per-token rules have no step state
        """The optimizer step's last call of ``weights`` is done."""

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
        if max_weight is not None and not (isinstance(max_weight, (int, float)) and max_weight > 0):
            raise LossParamError("max_weight", f"max_weight must be a number > 0 (or None), got {max_weight!r}")
        if not (isinstance(nll_mix, (int, float)) and 0.0 <= nll_mix <= 1.0):
            raise LossParamError("nll_mix", f"nll_mix must be a number in [0, 1], got {nll_mix!r}")
        if normalize not in ("weights", "tokens"):
            raise LossParamError("normalize", f"normalize must be 'weights' or 'tokens', got {normalize!r}")
        self.rule = rule
        self.max_weight = None if max_weight is None else float(max_weight)
        self.nll_mix = float(nll_mix)
        self.normalize = normalize
        self._step: StepAccumulator | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def single_pass(self) -> bool:
        """Weights known chunk by chunk and one global scale: gradients can be formed in forward."""
        return self.rule.per_token and self.nll_mix == 0.0

    def clipped_weights(self, batch: TokenBatch) -> torch.Tensor:
        """float64 ``[N]``: the rule's weights of ``batch``, clipped at ``max_weight`` when one is set."""
        w = self.rule.weights(batch).to(torch.float64)
        if self.max_weight is not None:
            w = w.clamp(max=self.max_weight)
        return w

    def coefficients(self, sum_w: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global scalars (A, B) such that this call's gradient is that of sum_n (A w_n + B) l_n.

        Alone, a call is a whole step: A = (1 - m) / Z, B = m / N from its own global sums.  Inside
        ``optimizer_step`` the step's provisional scale 1/N is used (see ``losses/accumulator.py``).  A zero
        normaliser (all tokens ignored, or every weight zero) gives a zero coefficient, never a division
        by zero.
        """
        if self._step is not None:
            return self._step.coefficients(sum_w)
        z = sum_w if self.normalize == "weights" else count
        return (1.0 - self.nll_mix) * inverse_or_zero(z), self.nll_mix * inverse_or_zero(count)

    def summarize(
        self, sums: torch.Tensor, wmax: torch.Tensor, contributions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Statistics of one call from its global sums (``losses/accumulator.py`` ``SUM_NAMES``); inside an
        optimizer step the sums (and this rank's per-token w_n l_n ``contributions``) are added to the step's."""
        if self._step is not None:
            self._step.record(sums, wmax, contributions)
        return stats_from_sums(sums, wmax, self.nll_mix, self.normalize)

    @contextlib.contextmanager
    def optimizer_step(self, token_count: float) -> Iterator[StepAccumulator]:
        """All loss calls inside form one optimizer step's objective (gradient accumulation)::

            with loss.optimizer_step(token_count=N) as step:   # N: the step's valid tokens, all ranks
                for micro_batch in ...:
                    fused_linear_loss(..., loss=loss).loss.backward()
            grads *= step.gradient_scale()                    # before clipping; step.stats() for logs

        Truncation rules fix their threshold for the whole step at its start.
        """
        if self._step is not None:
            raise RuntimeError("optimizer_step is already open for this loss (steps do not nest)")
        self._step = StepAccumulator(token_count, self.nll_mix, self.normalize)
        self.rule.begin_step()
        try:
            yield self._step
        finally:
            self.rule.end_step()
            self._step = None

    @property
    def in_step(self) -> bool:
        return self._step is not None

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

    Shared options for every rule: ``max_weight``, ``nll_mix``, ``normalize``.  An unknown name raises
    ``ValueError``; an unknown or invalid parameter raises ``LossParamError`` (a ``ValueError``) whose
    ``param`` names it.
    """
    if name not in _RULES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(known_rules())}")
    cls = _RULES[name]
    params = dict(params)
    shared = {k: params.pop(k) for k in _SHARED if k in params}
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise LossParamError(
            unknown[0], f"{name}: unknown parameter {unknown[0]!r}; allowed: {', '.join(allowed + list(_SHARED))}"
        )
    return RecallLoss(cls(**params), **shared)
