"""The one skeleton of every demo's ``summary.md``, and the pieces the demos' reports share.

A summary is a title, the demo's introduction (what ran: model, data, sizes, settings of each loss) and
sections, each a heading and its lines; each demo's report (``demo/report.py``, ``demo/fortunes_report.py``)
fills them with statements computed from its ``sweep.csv`` by ``demo/verdicts.py``.  A new demo writes a
``Section`` list and calls ``summary_document``; the layout (blank lines, headings) is this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from recall_dist.demo.stages import fmt_time

# What every summary asks first, in these words: does temperature alone buy the reference more Recall?
TEMPERATURE_QUESTION = "Does raising the temperature buy NLL more Recall?"


@dataclass
class Section:
    heading: str
    lines: list[str] = field(default_factory=list)


def summary_document(title: str, intro: list[str], sections: list[Section]) -> str:
    """``# title``, the intro (its own blank lines included), then every non-empty section as
    ``## heading``, a blank line and its lines, sections separated by a blank line."""
    lines = [f"# {title}", "", *intro]
    for i, section in enumerate(s for s in sections if s is not None):
        lines += ([""] if i else []) + [f"## {section.heading}", "", *section.lines]
    return "\n".join(lines) + "\n"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def wall_time_sentence(wall_seconds: float | None) -> str:
    return f" Wall time of the run: {fmt_time(wall_seconds)}." if wall_seconds is not None else ""


def loss_settings(losses) -> list[str]:
    """'model: rule(param=value, ...)' of every ``pipeline.Setting`` (and its own steps and lr, when it sets
    them), the rule's defaults filled in from the rule itself (so the report shows what ran, not what the demo
    passed)."""
    import inspect

    from recall_dist.losses import build_loss

    out = []
    for s in losses:
        built = build_loss(s.loss, **s.params)
        keys = [k for k in inspect.signature(type(built.rule).__init__).parameters if k != "self"]
        shown = [f"{k}={getattr(built.rule, k)!r}" for k in keys if k in ("alpha", "lam", "drop", "granularity")]
        shown += [f"max_weight={built.max_weight:g}"] if built.max_weight is not None else []
        shown += [f"nll_mix={built.nll_mix:g}"] if built.nll_mix else []
        own = ([f"for {s.steps} steps"] if s.steps else []) + ([f"at lr {s.lr:g}"] if s.lr is not None else [])
        out.append(f"{s.name}: `{s.loss}({', '.join(shown)})`" + "".join(" " + x for x in own))
    return out
