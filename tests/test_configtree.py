"""recall_dist/configtree.py on a config tree of its own: values converted to the annotated types, and every
error naming the full dotted key, the value and what is allowed; ``key=value`` overrides parsed as YAML;
``to_dict`` / ``from_dict`` round trips; ``ConfigError`` survives pickling (a Ray worker's error reaches
the driver).  The real trees (``TrainConfig``, ``SweepConfig``) through them: tests/train/test_config.py,
tests/eval/test_sweep.py."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from recall_dist.configtree import (
    ConfigError,
    apply_overrides,
    check,
    from_dict,
    load_config,
    load_yaml,
    to_dict,
)


@dataclass
class Inner:
    alpha: float = 1.0
    kind: Literal["a", "b"] = "a"

    def __post_init__(self):
        check(self.alpha > 0, "alpha", self.alpha, "must be > 0")


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    layers: list[Inner] = field(default_factory=list)
    steps: int = 10
    flag: bool = False
    limit: int | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    sizes: tuple[int, ...] = ()

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_values_are_converted_to_the_annotated_types():
    cfg = from_dict(
        Outer,
        {
            "name": "x",
            "inner": {"alpha": 2, "kind": "b"},  # an int where a float is expected: a float
            "layers": [{"alpha": "1e-4"}, {}],  # YAML 1.1 reads 1e-4 as a string: still a number
            "limit": 5,
            "extra": {"anything": [1, "two"]},
            "sizes": [1, 2],
        },
    )
    assert cfg == Outer(
        name="x",
        inner=Inner(2.0, "b"),
        layers=[Inner(1e-4), Inner()],
        limit=5,
        extra={"anything": [1, "two"]},
        sizes=(1, 2),
    )
    assert type(cfg.inner.alpha) is float and type(cfg.layers[0].alpha) is float
    assert isinstance(cfg.sizes, tuple)
    assert from_dict(Outer, {"name": "x", "limit": None}).limit is None


@pytest.mark.parametrize(
    "data,message",
    [
        ({}, "name: is required but missing"),
        ({"name": "x", "stepz": 1}, "Outer: unknown key 'stepz'; allowed: name, inner, layers, steps"),
        ({"name": "x", "inner": {"beta": 1}}, "inner: unknown key 'beta'; allowed: alpha, kind"),
        ({"name": "x", "inner": {"kind": "c"}}, "inner.kind: 'c' is not allowed; allowed: a, b"),
        ({"name": "x", "inner": {"alpha": -1}}, "inner.alpha: -1.0 is not allowed; must be > 0"),
        ({"name": "x", "layers": [{}, {"alpha": "big"}]}, "layers[1].alpha: expected a number, got 'big'"),
        ({"name": "x", "layers": {"alpha": 1}}, "layers: expected a list"),
        ({"name": "x", "inner": 3}, "inner: expected a mapping for Inner, got 3"),
        ({"name": "x", "steps": 2.5}, "steps: expected an integer, got 2.5"),
        ({"name": "x", "steps": True}, "steps: expected an integer, got True"),  # a bool is not a count
        ({"name": "x", "flag": "yes"}, "flag: expected true/false, got 'yes'"),
        ({"name": "x", "flag": 1}, "flag: expected true/false, got 1"),
        ({"name": "x", "inner": {"alpha": float("nan")}}, "inner.alpha: expected a finite number, got nan"),
        ({"name": "x", "limit": "five"}, "limit: 'five' matches none of ['int', 'NoneType']"),
        ({"name": 7}, "name: expected a string, got 7"),
        ({"name": "x", "steps": -1}, "Outer: steps must be >= 0"),  # a ValueError of __post_init__
    ],
)
def test_errors_name_the_dotted_key_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.key == message.split(":")[0]


def test_to_dict_round_trips():
    cfg = Outer(name="x", inner=Inner(0.5, "b"), layers=[Inner(3.0)], path=Path("/data/a"), sizes=(4,))
    data = to_dict(cfg)
    assert data["path"] == "/data/a" and data["inner"] == {"alpha": 0.5, "kind": "b"} and data["sizes"] == [4]
    assert from_dict(Outer, data) == Outer(
        name="x", inner=Inner(0.5, "b"), layers=[Inner(3.0)], path="/data/a", sizes=(4,)
    )  # a Path comes back as the string it was written as (no Path conversion)


def test_overrides_set_nested_keys_parsed_as_yaml():
    data = {"inner": {"alpha": 1.0}}
    apply_overrides(data, ["inner.alpha=1.4", "inner.kind=b", "steps=3", "flag=true", "limit=", "extra.a.b=[1, x]"])
    assert data == {
        "inner": {"alpha": 1.4, "kind": "b"},
        "steps": 3,
        "flag": True,
        "limit": None,  # an empty value is null
        "extra": {"a": {"b": [1, "x"]}},  # intermediate mappings are created
    }
    with pytest.raises(ConfigError, match=r"^steps: override must look like key=value"):
        apply_overrides(data, ["steps"])
    with pytest.raises(ConfigError, match=r"^steps.x: cannot set a sub-key: 'steps' is not a mapping"):
        apply_overrides(data, ["steps.x=1"])


def test_load_config_reads_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  alpha: 2.0\nsteps: 4\n")
    cfg = load_config(Outer, path, ["inner.alpha=1e-4", "steps=5"])
    assert cfg == Outer(name="run", inner=Inner(1e-4), steps=5)
    assert load_config(Outer, None, ["name=cli"]) == Outer(name="cli")
    with pytest.raises(ConfigError, match=r"^config: file not found: .*missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"^config: .*list.yaml must hold a mapping at top level, got list"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


class _NamedError(ConfigError):
    def __init__(self, path: str):  # another signature than ConfigError's
        super().__init__("data.source", f"{path} does not exist")


def test_config_errors_survive_pickling():
    for error in (ConfigError("loss.alpha", "-1.0 is not allowed"), _NamedError("/x.jsonl")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error)
        assert (again.key, again.message, str(again)) == (error.key, error.message, str(error))
    assert str(ConfigError("", "no key")) == "no key"
