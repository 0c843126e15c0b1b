"""``samples.md`` of ``recall-dist demo-lm``: a few answers sampled from every fine-tuned model at T = 1
and at the sweep's coldest T, for the first prompts of each group's support file, each marked valid or
not.  The sweep's numbers are exact (teacher forcing); these samples are the check a reader can see:
what the invalid mass looks like (extra words, a wrong name, a name cut short).

Sampling is ``eval/generate.py``'s (pure tempered sampling over the whole vocabulary, a KV cache, a seed
per row), conditioned on exactly the ids the sweep and training use (``eval/tokens.prompt_ids``).
"""

from __future__ import annotations

from pathlib import Path

from recall_dist.seeding import derive_seed

MAX_NEW_TOKENS = 24  # the longest answers are ~15 tokens; a longer sample is invalid anyway


def sample_answers(path: Path, prompts: list, temperatures: list[float], samples: int, seed: int = 0) -> dict:
    """(prompt key, T) -> [(text, valid)] of ``samples`` answers of the model at ``path`` per prompt and T;
    ``prompts``: ``eval/support_file.Support`` objects."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_dist.eval.generate import SampleRow, sample_rows, stop_token_ids, strip_stop
    from recall_dist.eval.support_file import prompt_key
    from recall_dist.eval.tokens import pad_token_id, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    rows, keys = [], []
    for support in prompts:
        ids = tuple(prompt_ids(tokenizer, support.prompt))
        for t in temperatures:
            for k in range(samples):
                rows.append(SampleRow(ids, t, derive_seed(seed, prompt_key(support.prompt), t, k)))
                keys.append((support, t))
    stops = stop_token_ids(model, tokenizer)
    with torch.no_grad():
        generated = sample_rows(model, rows, MAX_NEW_TOKENS, stops, pad_token_id(tokenizer))
    out: dict = {}
    for (support, t), ids in zip(keys, generated, strict=True):
        text = tokenizer.decode(strip_stop(ids, stops), skip_special_tokens=True)
        ended = any(i in stops for i in ids)
        out.setdefault((prompt_key(support.prompt), t), []).append((text, ended and text in support.completions))
    return out


def _question(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def _quote(text: str) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return f"`{text}`" if text else "*(empty)*"


def samples_markdown(
    models: dict[str, Path], groups: dict[str, Path], temperatures: list[float], per_group: int, samples: int
) -> str:
    """The text of samples.md: per model, per group, its first ``per_group`` prompts at T = 1 (the closest
    swept T) and the coldest swept T."""
    from recall_dist.eval.support_file import prompt_key, read_supports

    shown = sorted({min(temperatures, key=lambda t: abs(t - 1.0)), min(temperatures)})
    prompts = {g: list(read_supports(path).values())[:per_group] for g, path in groups.items()}
    lines = [
        "# recall-dist demo-lm: sampled answers",
        "",
        f"{samples} answers per prompt sampled from each model at T = {' and '.join(f'{t:g}' for t in shown)} "
        "(full vocabulary, no top-k/top-p); ✓ = one of the prompt's valid answers, ended by the end-of-turn "
        "token. The summary's numbers are exact; these are what a user would see.",
        "",
    ]
    for model, path in models.items():
        answers = sample_answers(path, [s for group in prompts.values() for s in group], shown, samples)
        lines += [f"## {model}", ""]
        for group, supports in prompts.items():
            for support in supports:
                lines.append(f"**{_question(support.prompt)}** ({group} prompt, {len(support.completions)} answers)")
                lines.append("")
                for t in shown:
                    got = answers[(prompt_key(support.prompt), t)]
                    cells = ", ".join(f"{_quote(text)}{' ✓' if valid else ''}" for text, valid in got)
                    lines.append(f"- T = {t:g} ({sum(v for _, v in got)}/{len(got)} valid): {cells}")
                lines.append("")
    return "\n".join(lines)


def write_samples(
    models: dict[str, Path], groups: dict[str, Path], out_path: Path, temperatures, per_group: int, samples: int
) -> Path:
    out_path.write_text(samples_markdown(models, groups, list(temperatures), per_group, samples))
    return out_path
