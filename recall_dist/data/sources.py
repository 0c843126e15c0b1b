"""Where rows come from: a local ``.jsonl``/``.json``/``.parquet``/``.csv``/``.txt`` file, a folder of
such files (splits from the file names, as ``datasets`` names them: ``train.jsonl``, ``test.jsonl``,
...), a ``datasets.save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``), or a Hugging Face hub
dataset; and the split to read, optionally sliced (``train[:90%]``, ``train[90%:]``, ``test[:500]``).

A source that looks local (``looks_local``) never reaches the network: a missing one is a ``ConfigError``
naming the key.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from recall_dist.configtree import ConfigError

# File suffix -> the ``datasets`` packaged builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
SINGLE_SPLIT = "train"  # the split name of a single file and of a saved Dataset (datasets' convention)
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


@dataclass(frozen=True)
class SplitSpec:
    """A split name and an optional row slice (``start``/``stop``: row counts or percentages, Python
    slice semantics; a percentage is rounded to the nearest row, so ``[:p%]`` and ``[p%:]`` partition)."""

    name: str
    start: str | None = None
    stop: str | None = None

    def rows(self, n: int) -> range:
        """The row indices of a split of ``n`` rows that this spec keeps."""

        def bound(value: str | None) -> int | None:
            if value is None:
                return None
            if value.endswith("%"):
                return round(int(value[:-1]) * n / 100)
            return int(value)

        return range(n)[slice(bound(self.start), bound(self.stop))]

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None


def parse_split(spec: str, key: str = "data.split") -> SplitSpec:
    """``"train"``, ``"train[:90%]"``, ``"test[100:200]"`` -> ``SplitSpec`` (``ConfigError`` naming ``key``)."""
    match = _SPLIT.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ConfigError(
            key, f"{spec!r} is not allowed; a split name, optionally sliced: train, train[:90%], test[:500]"
        )
    return SplitSpec(match["name"], match["start"], match["stop"])


def looks_local(name: str) -> bool:
    """Whether ``name`` is a local path rather than a hub name (``name`` or ``org/name``): it exists,
    starts with ``.``, ``/`` or ``~``, has a data file's suffix, has more than one ``/``, or its first
    component is a local directory (``data/typo.jsonl``, ``models/typo``)."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or path.suffix.lower() in BUILDERS
        or name.count("/") > 1
        or "\\" in name
        or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    )


def saved_kind(folder: Path) -> str | None:
    """``"dict"`` / ``"dataset"`` for a ``save_to_disk`` folder of a DatasetDict / Dataset, else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def _is_data(path: Path) -> bool:
    """A data file, a save_to_disk folder, or a folder holding data files."""
    if path.is_file():
        return path.suffix.lower() in BUILDERS
    return path.is_dir() and (saved_kind(path) is not None or any(p.suffix.lower() in BUILDERS for p in path.iterdir()))


def near_local_data(name: str) -> str | None:
    """A local data file or folder whose name (or stem) is a near miss of ``name`` (``chats`` for
    ``chats.jsonl``, ``chat.jsonl`` for ``chats.jsonl``), or None."""
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not parent.is_dir():
        return None
    names = {}
    for entry in parent.iterdir():
        if _is_data(entry):
            names.setdefault(entry.name, entry)
            names.setdefault(entry.stem, entry)
    match = difflib.get_close_matches(path.name, list(names), n=1, cutoff=0.85)
    return str(parent / names[match[0]].name) if match else None


def local_path(source: str, key: str = "data.source") -> Path | None:
    """The local file or folder ``source`` names (checked: it exists, a file has a supported suffix),
    or None for a hub name.  A near miss of a local data file's name is a typo, not a hub name."""
    near = None if Path(source).expanduser().exists() else near_local_data(source)
    if not (looks_local(source) or near):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        hint = f"; did you mean {near!r}?" if near else ""
        hub = "a hub dataset is named 'name' or 'org/name'"
        raise ConfigError(key, f"{source!r}: file or directory not found{hint} (a local path; {hub})")
    if path.is_file() and path.suffix.lower() not in BUILDERS:
        raise ConfigError(
            key, f"{source!r}: unsupported file type {path.suffix or '(none)'!r}; supported: {', '.join(BUILDERS)}"
        )
    return path


def folder_splits(folder: Path, key: str = "data.source") -> dict[str, list[Path]]:
    """The data files of each split of a folder of files (``datasets``' split-name conventions; no split
    names: every file is ``train``).  Only one file type per folder."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
    except Exception:  # datasets raises EmptyDatasetError for a folder without data files
        patterns = {}
    found = DataFilesDict.from_patterns(patterns, base_path=str(folder)) if patterns else {}
    splits = {
        str(name): sorted(Path(f) for f in files if Path(f).suffix.lower() in BUILDERS) for name, files in found.items()
    }
    splits = {name: files for name, files in splits.items() if files}
    if not splits:
        raise ConfigError(
            key, f"{str(folder)!r}: a folder with no data files ({', '.join(BUILDERS)}) and not a save_to_disk folder"
        )
    suffixes = sorted({f.suffix.lower() for files in splits.values() for f in files})
    if len({BUILDERS[s] for s in suffixes}) > 1:
        raise ConfigError(key, f"{str(folder)!r}: mixes file types {', '.join(suffixes)}; keep one type per folder")
    return splits


def split_names(source: str, key: str = "data.source") -> list[str] | None:
    """The splits a local source has (None for a hub dataset, whose splits are known once loaded)."""
    path = local_path(source, key)
    if path is None:
        return None
    if path.is_file():
        return [SINGLE_SPLIT]
    kind = saved_kind(path)
    if kind == "dict":
        import datasets

        return list(datasets.load_from_disk(str(path)).keys())
    if kind == "dataset":
        return [SINGLE_SPLIT]
    return list(folder_splits(path, key))


def check_split(source: str, spec: SplitSpec, source_key: str, split_key: str) -> None:
    """Raise ``ConfigError`` naming ``split_key`` when a local ``source`` has no split ``spec.name``."""
    names = split_names(source, source_key)
    if names is not None and spec.name not in names:
        hint = " (one file or a saved Dataset is one split, 'train'; hold rows out with train[:90%] / train[90%:])"
        raise ConfigError(
            split_key,
            f"{spec.name!r}: {source!r} has no such split; its splits: {', '.join(names)}"
            f"{hint if names == [SINGLE_SPLIT] else ''}",
        )


def csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _load_files(files: list[Path]):
    """One ``datasets.Dataset`` of local files of one type (CSV columns read as strings, empty cells as
    ``""``: pandas would otherwise turn ``12`` into an integer and an empty cell into NaN)."""
    import datasets

    builder = BUILDERS[files[0].suffix.lower()]
    options = {}
    if builder == "csv":
        features = datasets.Features({name: datasets.Value("string") for name in csv_header(files[0])})
        options = {"features": features, "keep_default_na": False}
    return datasets.load_dataset(
        builder, data_files={SINGLE_SPLIT: [str(f) for f in files]}, split=SINGLE_SPLIT, **options
    )


def _open_local(path: Path, spec: SplitSpec, source_key: str):
    import datasets

    if path.is_file():
        return _load_files([path])
    kind = saved_kind(path)
    if kind is not None:
        loaded = datasets.load_from_disk(str(path))
        return loaded[spec.name] if kind == "dict" else loaded
    return _load_files(folder_splits(path, source_key)[spec.name])


def _open_hub(source: str, spec: SplitSpec, source_key: str):
    import datasets

    try:
        return datasets.load_dataset(source, split=spec.name)
    except Exception as e:  # the hub client raises many types; all mean "cannot get it here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            source_key,
            f"{source!r}: cannot load split {spec.name!r} as a Hugging Face hub dataset (offline, unknown name or "
            f"split?): {type(e).__name__}: {reason[:300]}",
        ) from None


def open_split(source: str, split: str, source_key: str = "data.source", split_key: str = "data.split"):
    """The ``datasets.Dataset`` of split ``split`` (sliced when the spec says so) of ``source``."""
    spec = parse_split(split, split_key)
    path = local_path(source, source_key)
    if path is None:
        ds = _open_hub(source, spec, source_key)
    else:
        check_split(source, spec, source_key, split_key)
        ds = _open_local(path, spec, source_key)
    return ds.select(spec.rows(len(ds))) if spec.sliced else ds
