"""The known-support demo's data: prompts whose valid answers are known exactly, read from Debian's
``iso-codes`` package (``/usr/share/iso-codes/json/``; ``apt-get install iso-codes``).  Data only: no
model, no training, no evaluation.

Four sources, each a family of prompts (``Prompt.source`` names the standard):

- ``iso_3166-2`` subdivisions: "Name a region of France." -> the country's top-level subdivisions
  (the entries without a ``parent``: France's 13 metropolitan regions, its overseas regions and
  collectivities; not its departments), one prompt per country.
- ``iso_639-2`` languages: "Name a language whose name starts with the letter K." -> the ISO 639-2
  individual languages with that initial (collective "... languages" codes, the special codes and the
  dated stages written "English, Old" left out).  One prompt per letter: "Name a language" over all
  of them (about 400) is a support far wider than the others.
- ``iso_4217`` currencies: "Name a currency called the dollar." -> the currencies whose name holds
  that word (Dollar, Franc, Peso, Pound, Dinar: the words shared by at least ``CURRENCY_FAMILY`` = 8 names).
  Grouping by the currency's family asks what a model can know; all ~160 names at once, or a letter
  bucket, would not.  Funds codes (BOV, CHE, CLF, ...) and the X codes that are no currency (gold,
  SDR, test codes) are left out.
- ``iso_15924`` scripts: "Name a writing system whose name starts with the letter M." -> the scripts
  with that initial (aliases, variants, private-use and Z codes left out).

Every prompt keeps ``min_answers`` to ``max_answers`` answers (8-60), so no prompt dominates the
Recall or Precision averaged over prompts.  The target P is uniform over each prompt's answers.

Names are cleaned (``clean_name``): NFC, white space folded; ISO's annotations dropped (a trailing
``[alternative name]``, ``(note)`` or ``*``), its inverted forms put back in reading order
("Asturias, Principado de" -> "Principado de Asturias"; lists such as "Newry, Mourne and Down"
kept); a name that does not start with a letter, or holds a control character or one a chat
template or tokenizer may read as markup (``< > { } | \\ ```), is dropped.  Unicode letters stay (the
tokenizer handles them).  Exact duplicates within a prompt are dropped; answers are sorted.

The split: a prompt is held out when the SHA-256 of its text is 0 modulo ``HELDOUT_EVERY`` (5: about
20% held out), like ``demo/fortunes.py``'s fortunes; deterministic, independent of file order and of the
package's version for the prompts it keeps.  ``training_examples`` never draws a held-out prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from recall_dist.io import atomic_write_text

ISO_DIR = Path("/usr/share/iso-codes/json")
SOURCES = ("iso_3166-2", "iso_639-2", "iso_4217", "iso_15924")
MIN_ANSWERS, MAX_ANSWERS = 8, 60
CURRENCY_FAMILY = 8  # names sharing a word that make it a currency family ("Dollar")
HELDOUT_EVERY = 5  # one prompt in five is held out (by the hash of its text)

SUBDIVISION_PROMPT = "Name a region of {country}."
LANGUAGE_PROMPT = "Name a language whose name starts with the letter {letter}."
CURRENCY_PROMPT = "Name a currency called the {word}."
SCRIPT_PROMPT = "Name a writing system whose name starts with the letter {letter}."
# The same questions in words the fine-tunes never see (``reworded``; demo-lm's "reworded" prompt group):
# whether what a loss does to the temperature curve carries over to a new wording of a question whose
# answers it trained on, apart from whether the model knows the answers of a new question at all.
REWORDINGS = {
    SUBDIVISION_PROMPT: "Tell me one of the regions of {country}.",
    LANGUAGE_PROMPT: "Tell me one language whose name begins with {letter}.",
    CURRENCY_PROMPT: "Tell me one currency known as the {word}.",
    SCRIPT_PROMPT: "Tell me one writing system whose name begins with {letter}.",
}

# ISO 4217's funds and units of account, and its X codes that are no currency (metals, SDR, bond-market
# units, test and "no currency" codes); XAF, XCD, XOF, XPF (and XCG) are currencies and stay.
FUNDS = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"})
NOT_MONEY = frozenset({"XAG", "XAU", "XBA", "XBB", "XBC", "XBD", "XDR", "XPD", "XPT", "XSU", "XTS", "XUA", "XXX"})
SPECIAL_LANGUAGES = frozenset({"mis", "mul", "und", "zxx"})
_MARKUP = set("<>{}|\\`")
_LEADING_MARKS = "'‘’ʻʼʿ"
_ANNOTATION = re.compile(r"\s*(\[[^\]]*\]|\([^)]*\)|\*)$")
_LIST_WORDS = {"and", "y", "et", "e", "und", "i"}
# Country names that read with "the" ("the Netherlands"); names holding one of _THE_WORDS do too.
_THE_NAMES = {"Bahamas", "Comoros", "Gambia", "Maldives", "Netherlands", "Philippines", "Seychelles"}
_THE_WORDS = {"Emirates", "Federation", "Islands", "Kingdom", "Republic", "State", "States", "United"}


@dataclass(frozen=True)
class Prompt:
    """One question and its valid answers (distinct, sorted); P is uniform over ``answers``."""

    text: str
    answers: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class Phrasing:
    """How a prompt becomes the user's turn: an optional system message, and a suffix to the question."""

    system: str | None = None
    suffix: str = ""


# The phrasings measured by benchmarks/iso_prompt_phrasing.py; PHRASING is the one with the highest
# valid mass on the un-fine-tuned SmolLM2-135M-Instruct: 8.1e-4 on average over 7 prompts, against 3.0e-5
# (plain) and 2.5e-4 (system message); that script's docstring has the table.
PHRASINGS = {
    "plain": Phrasing(),
    "suffix": Phrasing(suffix=" Answer with the name only."),
    "system": Phrasing(system="Answer with the name only, nothing else."),
}
PHRASING = PHRASINGS["suffix"]


# ---------------------------------------------------------------------------------------------
# Names


def clean_name(raw: str) -> str | None:
    """``raw`` NFC-normalised with its white space folded; None when it cannot be a clean reply: empty,
    not starting with a letter (one leading apostrophe allowed), or holding a control/format character
    or a markup character."""
    name = " ".join(unicodedata.normalize("NFC", raw).split())
    letters = name.lstrip(_LEADING_MARKS)  # "‘Ajmān", "'Eua": a transliterated ayin or glottal stop
    if not letters or len(name) - len(letters) > 1 or not unicodedata.category(letters[0]).startswith("L"):
        return None
    if any(ch in _MARKUP or unicodedata.category(ch).startswith("C") for ch in name):
        return None
    return name


def strip_annotations(name: str) -> str:
    """ISO's trailing notes removed, one after the other: "Catalunya [Cataluña]" -> "Catalunya",
    "Ilocos (Region I)" -> "Ilocos", "Alacant*" -> "Alacant".  A name that is only a note stays as it is."""
    while True:
        stripped = _ANNOTATION.sub("", name).strip()
        if stripped == name or not stripped:
            return stripped or name
        name = stripped


def uninvert(name: str, max_words: int = 4) -> str:
    """ISO's inverted form in reading order: "Murcia, Región de" -> "Región de Murcia", "Bristol, City
    of" -> "City of Bristol".  A name with one comma whose tail is up to ``max_words`` words and no list
    word ("and", "y", ...) is inverted; "Newry, Mourne and Down" is a list and stays."""
    if name.count(",") != 1:
        return name
    head, tail = (part.strip() for part in name.split(","))
    words = tail.split()
    if not head or not words or len(words) > max_words or _LIST_WORDS & set(words):
        return name
    return f"{tail} {head}"


def initial(name: str) -> str | None:
    """The name's first letter without its accents, upper case ("Ōtomí" -> "O"); None outside A-Z."""
    base = unicodedata.normalize("NFD", name[:1])[:1].upper()
    return base if "A" <= base <= "Z" else None


def country_phrase(entry: dict) -> str:
    """How a country reads after "of": its common name, in reading order, with "the" where English
    puts one ("the Netherlands", "the Democratic Republic of the Congo")."""
    name = uninvert(entry.get("common_name") or entry["name"], max_words=8)
    if name.startswith("The "):
        return "the " + name[4:]
    if name in _THE_NAMES or _THE_WORDS & set(name.split()):
        return "the " + name
    return name


def _answers(names) -> tuple[str, ...]:
    return tuple(sorted({n for n in names if n is not None}))


# ---------------------------------------------------------------------------------------------
# The sources


def read_standard(iso_dir: Path, standard: str) -> list[dict]:
    """The entries of ``iso_dir/iso_<standard>.json`` (e.g. ``3166-2``)."""
    path = Path(iso_dir) / f"iso_{standard}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ISO {standard} table; install Debian's package: apt-get install iso-codes")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get(standard), list):
        got = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected a {{{standard!r}: [entries]}} object, got {got}")
    return data[standard]


def subdivision_prompts(iso_dir: Path) -> list[Prompt]:
    """One prompt per country: its top-level ISO 3166-2 subdivisions (no ``parent``)."""
    countries = {c["alpha_2"]: c for c in read_standard(iso_dir, "3166-1")}
    names = defaultdict(list)
    for entry in read_standard(iso_dir, "3166-2"):
        if "parent" not in entry:
            names[entry["code"].split("-")[0]].append(clean_name(uninvert(strip_annotations(entry["name"]))))
    return [
        Prompt(SUBDIVISION_PROMPT.format(country=country_phrase(countries[code])), _answers(found), "iso_3166-2")
        for code, found in names.items()
        if code in countries
    ]


def _language_name(entry: dict) -> str | None:
    code = entry["alpha_3"]
    name = entry["name"].split(";")[0].strip()  # "Catalan; Valencian": the first name is the usual one
    if code in SPECIAL_LANGUAGES or code.startswith("qaa") or "languages" in name or "(Other)" in name:
        return None
    name = strip_annotations(name)
    return None if "," in name else clean_name(name)  # "English, Old": a dated stage of another language


def _script_name(entry: dict) -> str | None:
    name = entry["name"]
    if entry["alpha_4"][0] in "QZ" or "alias for" in name or "variant)" in name:
        return None  # private use, "undetermined", symbols, and the aliases and variants of other scripts
    return clean_name(strip_annotations(name).split(",")[0])  # "Mandaic, Mandaean": alternatives


def _by_initial(names, template: str, source: str) -> list[Prompt]:
    buckets = defaultdict(list)
    for name in names:
        if name is not None and initial(name) is not None:
            buckets[initial(name)].append(name)
    return [Prompt(template.format(letter=letter), _answers(found), source) for letter, found in buckets.items()]


def language_prompts(iso_dir: Path) -> list[Prompt]:
    """One prompt per initial letter over the ISO 639-2 individual languages."""
    return _by_initial(map(_language_name, read_standard(iso_dir, "639-2")), LANGUAGE_PROMPT, "iso_639-2")


def script_prompts(iso_dir: Path) -> list[Prompt]:
    """One prompt per initial letter over the ISO 15924 scripts."""
    return _by_initial(map(_script_name, read_standard(iso_dir, "15924")), SCRIPT_PROMPT, "iso_15924")


def currency_prompts(iso_dir: Path) -> list[Prompt]:
    """One prompt per currency family: a capitalised word shared by at least ``CURRENCY_FAMILY`` currency
    names ("Dollar": "US Dollar", "Canadian Dollar", ...).  A fixed threshold, not ``build_prompts``'
    bounds: below it the shared words stop being currency units ("Islands", "New")."""
    names = [
        clean_name(e["name"])
        for e in read_standard(iso_dir, "4217")
        if e["alpha_3"] not in FUNDS | NOT_MONEY and "(" not in e["name"]
    ]
    families = defaultdict(list)
    for name in filter(None, names):
        for word in set(name.split()):
            if word.isalpha() and word[0].isupper() and len(word) > 2:
                families[word].append(name)
    return [
        Prompt(CURRENCY_PROMPT.format(word=word.lower()), _answers(found), "iso_4217")
        for word, found in families.items()
        if len(found) >= CURRENCY_FAMILY
    ]


_BUILDERS = {
    "iso_3166-2": subdivision_prompts,
    "iso_639-2": language_prompts,
    "iso_4217": currency_prompts,
    "iso_15924": script_prompts,
}


def build_prompts(
    iso_dir: str | Path = ISO_DIR,
    sources: tuple[str, ...] = SOURCES,
    min_answers: int = MIN_ANSWERS,
    max_answers: int = MAX_ANSWERS,
) -> list[Prompt]:
    """The demo's prompts from ``sources`` (a subset of ``SOURCES``), those with ``min_answers`` to
    ``max_answers`` answers, in a fixed order: by source (as in ``SOURCES``), then by text."""
    unknown = [s for s in sources if s not in _BUILDERS]
    if unknown:
        raise ValueError(f"sources: unknown {unknown}; allowed: {', '.join(SOURCES)}")
    if not 1 <= min_answers <= max_answers:
        raise ValueError(f"answer bounds [{min_answers}, {max_answers}]: need 1 <= min_answers <= max_answers")
    prompts = []
    for source in SOURCES:
        if source in sources:
            built = _BUILDERS[source](Path(iso_dir))
            prompts += sorted((p for p in built if min_answers <= len(p.answers) <= max_answers), key=lambda p: p.text)
    texts = [p.text for p in prompts]
    if len(set(texts)) != len(texts):
        raise ValueError(f"{iso_dir}: two prompts with the same text: {sorted(t for t in texts if texts.count(t) > 1)}")
    return prompts


# ---------------------------------------------------------------------------------------------
# The split and the rows


def is_heldout(text: str) -> bool:
    """Whether the prompt ``text`` is held out: SHA-256 of the text, modulo ``HELDOUT_EVERY``."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def split_prompts(prompts: list[Prompt]) -> tuple[list[Prompt], list[Prompt]]:
    """``(training, held_out)`` prompts, each in the order given."""
    return [p for p in prompts if not is_heldout(p.text)], [p for p in prompts if is_heldout(p.text)]


def _template_pattern(template: str) -> re.Pattern:
    """``template`` as a regular expression whose ``{field}``s are named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile(
        "".join(f"(?P<{part}>.+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)), re.DOTALL
    )


def reworded(prompt: Prompt) -> Prompt:
    """``prompt`` asked in other words (``REWORDINGS``), with the same answers and source."""
    for template, rewording in REWORDINGS.items():
        match = _template_pattern(template).fullmatch(prompt.text)
        if match:
            return Prompt(rewording.format(**match.groupdict()), prompt.answers, prompt.source)
    raise ValueError(f"no rewording for the prompt {prompt.text!r}: it matches none of {list(REWORDINGS)}")


def prompt_messages(text: str, phrasing: Phrasing = PHRASING) -> list[dict]:
    """The chat turns before the answer: ``phrasing``'s system message, if any, and the user's question."""
    system = [{"role": "system", "content": phrasing.system}] if phrasing.system is not None else []
    return [*system, {"role": "user", "content": text + phrasing.suffix}]


def training_examples(prompts: list[Prompt], n: int, seed: int, phrasing: Phrasing = PHRASING) -> list[dict]:
    """``n`` chat examples ``{"messages": [..., user, assistant]}`` (``data/chat.py``'s format): the prompt
    drawn uniformly among the *training* prompts of ``prompts`` (held-out ones are skipped whatever the
    caller passes), the answer uniformly from its support.  Deterministic in ``seed`` and independent
    of the order of ``prompts``."""
    train = sorted(split_prompts(prompts)[0], key=lambda p: p.text)
    if not train:
        raise ValueError(f"training_examples: none of the {len(prompts)} prompts is a training prompt")
    if n < 0:
        raise ValueError(f"training_examples: n = {n}; expected n >= 0")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = rng.choice(train)
        answer = rng.choice(prompt.answers)
        examples.append(
            {"messages": [*prompt_messages(prompt.text, phrasing), {"role": "assistant", "content": answer}]}
        )
    return examples


def support_rows(prompts: list[Prompt], phrasing: Phrasing = PHRASING) -> list[dict]:
    """Rows ``{"messages": [...], "completion": answer, "p": 1/len(answers)}`` of a support file (the
    known-support sweep's input): the rows of one prompt share their ``messages`` and form its support."""
    return [
        {"messages": prompt_messages(p.text, phrasing), "completion": answer, "p": 1.0 / len(p.answers)}
        for p in prompts
        for answer in p.answers
    ]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """``rows`` as JSON lines (non-ASCII as ``\\u`` escapes, whatever the locale), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows), fsync=False)


def write_prompt_files(out: str | Path, prompts: list[Prompt], num_examples: int, seed: int) -> dict[str, Path]:
    """The demo's data files in ``out``: ``train.jsonl`` (``num_examples`` training examples),
    ``support_train.jsonl`` and ``support_heldout.jsonl`` (the supports of each half); returns their paths."""
    out = Path(out)
    train, heldout = split_prompts(prompts)
    return {
        "train": write_jsonl(out / "train.jsonl", training_examples(prompts, num_examples, seed)),
        "support_train": write_jsonl(out / "support_train.jsonl", support_rows(train)),
        "support_heldout": write_jsonl(out / "support_heldout.jsonl", support_rows(heldout)),
    }
