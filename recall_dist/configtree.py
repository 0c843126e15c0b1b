"""Typed config trees: dataclasses built from YAML dicts, validated at build time, with
``key=value`` overrides.  YAML lives at the edge only; everything inside is a dataclass.

Errors name the full dotted key, the bad value and what is allowed::

    ConfigError: loss.alpha = -1.0: must be > 0
    ConfigError: train.optimizer = 'sgdd': unknown key value; allowed: adam, adamw
    ConfigError: model: unknown key 'hiden_size'; allowed: name, path, ...
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range.  The message starts with the dotted key."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):  # pickled across processes (a Ray worker's error reaches the driver)
        return _rebuild_config_error, (type(self), self.key, self.message)


def _rebuild_config_error(cls: type, key: str, message: str) -> ConfigError:
    error = cls.__new__(cls)  # subclasses have their own __init__ signatures
    ConfigError.__init__(error, key, message)
    return error


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError`` naming ``key``, ``value`` and what is ``allowed`` unless ``condition``."""
    if not condition:
        raise ConfigError(key, f"{value!r} is not allowed; {allowed}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and dataclasses.is_dataclass(members[0]):  # an optional section: its own error
            return _convert(value, members[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass  # try the next member; the error below names them all
        raise ConfigError(key, f"{value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {k: _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string: accept what Python reads as a decimal number.
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, f"expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and failed validation
    (the dataclass's ``__post_init__`` raising ``ConfigError``/``ValueError``) name the dotted key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or _type_name(cls)
        raise ConfigError(where, f"unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required but missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix):
            raise ConfigError(f"{prefix}.{e.key}", str(e).split(": ", 1)[-1]) from None
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(prefix or _type_name(cls), str(e)) from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-serialisable) copy of a config tree."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value (e.g. loss.alpha=1.4)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, f"cannot set a sub-key: {k!r} is not a mapping")
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read YAML ``path`` (or start empty), apply ``key=value`` overrides, build and validate ``cls``."""
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, list(overrides))
    return from_dict(cls, data)
