"""Built-in sparse tasks whose target distribution P is known exactly, so the temperature sweep
can compute Precision = Q_T(supp P) and Recall against the true P (README, "Temperature sweep").

Registry: ``build_task("product", max_factor=30)``, ``build_task("product_conditional", ...)``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable

DIGITS = "0123456789"


class KnownSupportTask(ABC):
    """A distribution over (prompt, completion) pairs with an exactly known conditional P(c | p).

    Subclasses set ``name``, ``alphabet`` (every character a prompt or completion may contain, in
    a fixed order so that character tokenizers built from it are stable) and
    ``max_completion_chars``, and implement ``prompts``, ``target_distribution`` and ``sample``.
    """

    name: str
    alphabet: str
    max_completion_chars: int

    @abstractmethod
    def prompts(self) -> list[str]:
        """The task's distinct prompts, in a fixed order ("" for an unconditional task)."""

    def prompt_distribution(self) -> dict[str, float]:
        """P(prompt), the weight of each prompt in the task's distribution (uniform by default)."""
        prompts = self.prompts()
        return {p: 1.0 / len(prompts) for p in prompts}

    @abstractmethod
    def target_distribution(self, prompt: str) -> dict[str, float]:
        """Completion text -> P(completion | prompt); the values sum to 1.  The keys are the support."""

    @abstractmethod
    def sample(self, n: int, seed: int) -> list[dict]:
        """``n`` i.i.d. ``{"prompt": str, "completion": str}`` draws, deterministic in ``seed``."""


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}: must be an integer >= 1")
    return value


def _check_sample_args(n: int, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n = {n!r}: must be an integer >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed = {seed!r}: must be an integer")


def product_counts(max_factor: int) -> Counter:
    """#{(a, b) in {1..A}^2 : a * b = x} for every product x (keys are ints)."""
    return Counter(a * b for a in range(1, max_factor + 1) for b in range(1, max_factor + 1))


class ProductTask(KnownSupportTask):
    """Unconditional products: a, b ~ Uniform{1..A} independent, completion = str(a * b), prompt "".

    P(x) = #{(a, b) : a * b = x} / A^2.  The support is sparse among digit strings (e.g. for A = 30
    there are 308 distinct products among the numbers 1..900), which is the regime where the paper
    shows that temperature fails to buy Recall.
    """

    name = "product"
    alphabet = DIGITS

    def __init__(self, max_factor: int = 30):
        self.max_factor = _check_positive_int(max_factor, "max_factor")
        self.max_completion_chars = len(str(max_factor * max_factor))
        total = max_factor * max_factor
        self._distribution = {str(x): c / total for x, c in sorted(product_counts(max_factor).items())}

    def prompts(self) -> list[str]:
        return [""]

    def target_distribution(self, prompt: str) -> dict[str, float]:
        if prompt != "":
            raise ValueError(f"prompt = {prompt!r}: task {self.name!r} is unconditional; the only prompt is ''")
        return dict(self._distribution)

    def sample(self, n: int, seed: int) -> list[dict]:
        _check_sample_args(n, seed)
        rng = random.Random(seed)
        a_max = self.max_factor
        return [{"prompt": "", "completion": str(rng.randint(1, a_max) * rng.randint(1, a_max))} for _ in range(n)]


class ProductConditionalTask(KnownSupportTask):
    """Conditional products: a ~ Uniform{1..A} gives the prompt f"{a}*", b ~ Uniform{1..A} and the
    completion is str(a * b).  Each prompt's support has exactly A equally likely completions.
    """

    name = "product_conditional"
    alphabet = DIGITS + "*"

    def __init__(self, max_factor: int = 30):
        self.max_factor = _check_positive_int(max_factor, "max_factor")
        self.max_completion_chars = len(str(max_factor * max_factor))

    def prompts(self) -> list[str]:
        return [f"{a}*" for a in range(1, self.max_factor + 1)]

    def _factor(self, prompt: str) -> int:
        head = prompt[:-1]
        # Canonical decimal only ("07*" is not a prompt of the task: its support is empty).
        if (
            not prompt.endswith("*")
            or not head.isdigit()
            or head != str(int(head))
            or not 1 <= int(head) <= self.max_factor
        ):
            raise ValueError(f"prompt = {prompt!r}: task {self.name!r} expects '<a>*' with a in 1..{self.max_factor}")
        return int(head)

    def target_distribution(self, prompt: str) -> dict[str, float]:
        a = self._factor(prompt)
        return {str(a * b): 1.0 / self.max_factor for b in range(1, self.max_factor + 1)}

    def sample(self, n: int, seed: int) -> list[dict]:
        _check_sample_args(n, seed)
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a = rng.randint(1, self.max_factor)
            out.append({"prompt": f"{a}*", "completion": str(a * rng.randint(1, self.max_factor))})
        return out


_TASKS: dict[str, Callable[..., KnownSupportTask]] = {
    ProductTask.name: ProductTask,
    ProductConditionalTask.name: ProductConditionalTask,
}
_TASK_PARAMS = {ProductTask.name: {"max_factor"}, ProductConditionalTask.name: {"max_factor"}}


def known_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(name: str, **params) -> KnownSupportTask:
    """Build the registered task ``name`` with ``params``; unknown names/parameters raise ``ValueError``."""
    if name not in _TASKS:
        raise ValueError(f"task = {name!r}: unknown synthetic task; known tasks: {', '.join(known_tasks())}")
    unknown = sorted(set(params) - _TASK_PARAMS[name])
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown parameter of task {name!r}; allowed: {', '.join(sorted(_TASK_PARAMS[name]))}"
        )
    return _TASKS[name](**params)
