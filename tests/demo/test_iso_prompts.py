"""The known-support demo's data (``demo/iso_prompts.py``): name cleaning, prompts and supports from
a small iso-codes-shaped fixture (so the expectations do not move with the Debian package's version),
the hash split, training examples and support rows; one test on the real files when installed."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest

from recall_dist.demo.iso_prompts import (
    HELDOUT_EVERY,
    ISO_DIR,
    MAX_ANSWERS,
    MIN_ANSWERS,
    PHRASING,
    REWORDINGS,
    SOURCES,
    Prompt,
    build_prompts,
    clean_name,
    country_phrase,
    is_heldout,
    reworded,
    split_prompts,
    support_rows,
    training_examples,
    uninvert,
    write_prompt_files,
)

# Ten subdivisions of "Freedonia" (FD-01 .. FD-10), some written the ISO way; FD-05's child has a parent.
FREEDONIA = [
    "Northland [Nordland]",
    "Southland*",
    "Murcia, Región de",
    "Eastmarch (capital)",
    "West  Reach",
    "Cafe\u0301 Bay",  # "Café Bay" decomposed: equal to FD-07 after NFC
    "Café Bay",
    "//Karas",  # does not start with a letter: dropped
    "High<|im_end|>lands",  # chat-template markup: dropped
    "‘Ajmān",  # a leading ayin is kept
    "Lakeside",
    "Hill Country",
]
FREEDONIA_ANSWERS = tuple(
    sorted(
        [
            "Café Bay",
            "Eastmarch",
            "Hill Country",
            "Lakeside",
            "Northland",
            "Región de Murcia",
            "Southland",
            "West Reach",
            "‘Ajmān",
        ]
    )
)


def _write_iso(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    subdivisions = [
        {"code": f"FD-{i:02d}", "name": name, "type": "Region"} for i, name in enumerate(FREEDONIA, start=1)
    ]
    subdivisions.append({"code": "FD-AA", "name": "Child", "type": "District", "parent": "FD-05"})
    subdivisions += [{"code": f"SM-{i}", "name": f"Smallia {i}", "type": "Region"} for i in range(3)]  # too few
    subdivisions += [{"code": f"NL-{i:02d}", "name": f"Provincie {i:02d}", "type": "Province"} for i in range(12)]
    countries = [
        {"alpha_2": "FD", "name": "Freedonia, Republic of", "common_name": "Freedonia"},
        {"alpha_2": "SM", "name": "Smallia"},
        {"alpha_2": "NL", "name": "Netherlands"},
    ]
    words = ["Dollar"] * 9 + ["Franc"] * 3
    currencies = [{"alpha_3": f"C{i:02d}", "name": f"Land{i} {w}"} for i, w in enumerate(words)]
    currencies += [
        {"alpha_3": "XAU", "name": "Gold Dollar"},  # not a currency
        {"alpha_3": "USN", "name": "US Dollar (Next day)"},  # a fund
    ]
    k_languages = ["Kazakh", "Khmer", "Korean", "Kurdish", "Kikuyu; Gikuyu", "Kannada", "Kashmiri", "Komi"]
    languages = [{"alpha_3": f"k{i:02d}", "name": n} for i, n in enumerate(k_languages)]
    languages += [
        {"alpha_3": "kro", "name": "Kru languages"},  # collective
        {"alpha_3": "kxx", "name": "Kurdish, Old (to 1200)"},  # a dated stage
        {"alpha_3": "ki2", "name": "Korean"},  # a duplicate name
        {"alpha_3": "mul", "name": "Multiple languages"},
        {"alpha_3": "und", "name": "Undetermined"},
    ]
    scripts = [{"alpha_4": f"S{i:03d}", "name": f"Script{i}"} for i in range(9)]
    tables = {"3166-1": countries, "3166-2": subdivisions, "4217": currencies, "639-2": languages, "15924": scripts}
    for standard, entries in tables.items():
        (tmp_path / f"iso_{standard}.json").write_text(json.dumps({standard: entries}), encoding="utf-8")
    return tmp_path


def _by_text(prompts):
    return {p.text: p for p in prompts}


def test_clean_name_and_iso_forms():
    assert clean_name("  Saint \t Pierre\n et Miquelon ") == "Saint Pierre et Miquelon"  # white space folded
    assert clean_name("Cafe\u0301") == "Café"  # NFC
    for bad in ["", "   ", "//Karas", "12 Districts", "a{b}", "x|y", "Zero\u200bwidth", "bell\x07", "''Two marks"]:
        assert clean_name(bad) is None, bad
    assert uninvert("Asturias, Principado de") == "Principado de Asturias"
    assert uninvert("Newry, Mourne and Down") == "Newry, Mourne and Down"  # a list, not an inversion
    assert uninvert("Southern Nations, Nationalities and Peoples") == "Southern Nations, Nationalities and Peoples"
    assert country_phrase({"name": "Congo, The Democratic Republic of the"}) == "the Democratic Republic of the Congo"
    assert country_phrase({"name": "Netherlands"}) == "the Netherlands"
    assert country_phrase({"name": "Korea, Republic of", "common_name": "South Korea"}) == "South Korea"
    assert country_phrase({"name": "Barbados"}) == "Barbados"


def test_prompts_from_a_fixture(tmp_path):
    prompts = build_prompts(_write_iso(tmp_path))
    assert [p.source for p in prompts] == sorted((p.source for p in prompts), key=SOURCES.index)
    got = _by_text(prompts)
    assert set(got) == {
        "Name a region of Freedonia.",
        "Name a region of the Netherlands.",
        "Name a currency called the dollar.",
        "Name a language whose name starts with the letter K.",
        "Name a writing system whose name starts with the letter S.",
    }  # Smallia (3 subdivisions) and the franc (3 currencies) are too small
    # Annotations gone, the inversion undone, white space folded, NFC duplicates merged, sorted; the
    # child subdivision (it has a parent) and the unsafe names left out.
    assert got["Name a region of Freedonia."].answers == FREEDONIA_ANSWERS
    assert got["Name a region of the Netherlands."].answers == tuple(f"Provincie {i:02d}" for i in range(12))
    assert got["Name a currency called the dollar."].answers == tuple(sorted(f"Land{i} Dollar" for i in range(9)))
    assert got["Name a language whose name starts with the letter K."].answers == (
        "Kannada",
        "Kashmiri",
        "Kazakh",
        "Khmer",
        "Kikuyu",
        "Komi",
        "Korean",
        "Kurdish",
    )
    assert got["Name a writing system whose name starts with the letter S."].answers == tuple(
        f"Script{i}" for i in range(9)
    )
    assert {p.source for p in prompts} == set(SOURCES)
    for p in prompts:
        assert MIN_ANSWERS <= len(p.answers) <= MAX_ANSWERS and len(set(p.answers)) == len(p.answers)


def test_bounds_sources_and_errors(tmp_path):
    iso = _write_iso(tmp_path)
    narrow = _by_text(build_prompts(iso, min_answers=9, max_answers=10))
    assert set(narrow) == {
        "Name a region of Freedonia.",
        "Name a currency called the dollar.",
        "Name a writing system whose name starts with the letter S.",
    }
    only = build_prompts(iso, sources=("iso_4217",), min_answers=3)
    assert [p.text for p in only] == ["Name a currency called the dollar."]  # 3 francs are no family
    with pytest.raises(ValueError, match="unknown \\['iso_9999'\\]; allowed: iso_3166-2"):
        build_prompts(iso, sources=("iso_9999",))
    with pytest.raises(ValueError, match="need 1 <= min_answers <= max_answers"):
        build_prompts(iso, min_answers=10, max_answers=5)
    with pytest.raises(FileNotFoundError, match="apt-get install iso-codes"):
        build_prompts(tmp_path / "missing")


def _many_prompts(n=60):
    from recall_dist.demo.iso_prompts import Prompt

    return [
        Prompt(f"Name a thing of kind {i}.", tuple(f"thing {i}.{j}" for j in range(2 + i % 5)), "test")
        for i in range(n)
    ]


def test_split_is_by_hash_deterministic_and_disjoint(tmp_path):
    prompts = _many_prompts()
    train, heldout = split_prompts(prompts)
    expected = {p.text for p in prompts if int(hashlib.sha256(p.text.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0}
    assert {p.text for p in heldout} == expected and 4 <= len(heldout) <= 20
    assert not {p.text for p in train} & expected and len(train) + len(heldout) == len(prompts)
    again = split_prompts(list(reversed(prompts)))
    assert [p.text for p in again[1]] == [p.text for p in reversed(heldout)]
    assert all(is_heldout(p.text) for p in heldout)


def test_training_examples_never_see_heldout_prompts(tmp_path):
    prompts = _many_prompts()
    examples = training_examples(prompts, 3000, seed=7)
    assert len(examples) == 3000
    asked = Counter()
    support = {p.text + PHRASING.suffix: set(p.answers) for p in prompts}
    for example in examples:
        *turns, reply = example["messages"]
        assert [m["role"] for m in turns] == (["system"] if PHRASING.system is not None else []) + ["user"]
        assert reply["role"] == "assistant" and reply["content"] in support[turns[-1]["content"]]
        asked[turns[-1]["content"]] += 1
    heldout = {p.text + PHRASING.suffix for p in prompts if is_heldout(p.text)}
    assert heldout and not heldout & set(asked)
    assert len(asked) == len(prompts) - len(heldout)  # every training prompt drawn, roughly uniformly
    assert max(asked.values()) < 2.5 * min(asked.values())
    # Deterministic in the seed, whatever the order of the prompts; another seed draws others.
    assert training_examples(list(reversed(prompts)), 3000, seed=7) == examples
    assert training_examples(prompts, 3000, seed=8) != examples
    with pytest.raises(ValueError, match="none of the 2 prompts is a training prompt"):
        training_examples([p for p in prompts if is_heldout(p.text)][:2], 5, seed=0)


def test_support_rows_are_uniform_and_written_atomically(tmp_path):
    prompts = build_prompts(_write_iso(tmp_path / "iso"))
    rows = support_rows(prompts)
    by_prompt = {}
    for row in rows:
        assert set(row) == {"messages", "completion", "p"}
        by_prompt.setdefault(json.dumps(row["messages"]), []).append(row)
    assert len(by_prompt) == len(prompts) and len(rows) == sum(len(p.answers) for p in prompts)
    for p in prompts:
        group = by_prompt[
            json.dumps(
                [
                    *([{"role": "system", "content": PHRASING.system}] if PHRASING.system else []),
                    {"role": "user", "content": p.text + PHRASING.suffix},
                ]
            )
        ]
        assert [r["completion"] for r in group] == list(p.answers)
        assert math.isclose(math.fsum(r["p"] for r in group), 1.0, rel_tol=0, abs_tol=1e-12)
        assert all(r["p"] == 1 / len(p.answers) for r in group)
    paths = write_prompt_files(tmp_path / "data", prompts, num_examples=50, seed=0)
    lines = {k: [json.loads(line) for line in v.read_text(encoding="ascii").splitlines()] for k, v in paths.items()}
    train, heldout = split_prompts(prompts)
    assert lines["train"] == training_examples(prompts, 50, seed=0)
    assert lines["support_train"] == support_rows(train) and lines["support_heldout"] == support_rows(heldout)
    assert not list((tmp_path / "data").glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.skipif(not (ISO_DIR / "iso_3166-2.json").is_file(), reason="Debian's iso-codes is not installed")
def test_real_iso_codes():
    prompts = build_prompts()
    got = _by_text(prompts)
    counts = Counter(p.source for p in prompts)
    assert 100 <= counts["iso_3166-2"] <= 200 and set(counts) == set(SOURCES)
    france = got["Name a region of France."].answers
    assert {"Bretagne", "Normandie", "Île-de-France", "Corse"} <= set(france) and "Paris" not in france
    assert "Wales" not in {a for p in prompts for a in p.answers}  # the United Kingdom has 4: too few
    spain = got["Name a region of Spain."].answers
    assert "Principado de Asturias" in spain and "Catalunya" in spain
    assert "US Dollar" in got["Name a currency called the dollar."].answers
    heldout = split_prompts(prompts)[1]
    assert 0.1 < len(heldout) / len(prompts) < 0.3
    for p in prompts:
        assert MIN_ANSWERS <= len(p.answers) <= MAX_ANSWERS and len(set(p.answers)) == len(p.answers)
        assert all(clean_name(a) == a for a in p.answers)


def test_reworded_keeps_the_answers_and_changes_only_the_words():
    """Each template's prompt, reworded, is the rewording with the same fields, answers and source; a prompt
    of no template is an error that names it."""
    cases = {
        "Name a region of the Netherlands.": "Tell me one of the regions of the Netherlands.",
        "Name a language whose name starts with the letter K.": "Tell me one language whose name begins with K.",
        "Name a currency called the dollar.": "Tell me one currency known as the dollar.",
        "Name a writing system whose name starts with the letter M.": (
            "Tell me one writing system whose name begins with M."
        ),
    }
    assert len(cases) == len(REWORDINGS)
    for text, expected in cases.items():
        prompt = Prompt(text, ("A", "B"), "src")
        assert reworded(prompt) == Prompt(expected, ("A", "B"), "src")
    with pytest.raises(ValueError, match=r"no rewording for the prompt 'Name a river of France\.'"):
        reworded(Prompt("Name a river of France.", ("Seine",), "src"))
