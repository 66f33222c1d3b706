"""Typed dataclass configs, filled from YAML presets and command-line overrides.

There is no global config object: each job takes its dataclass explicitly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from catnet.errors import CatnetError

T = TypeVar("T")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0]) if len(args) == 1 else value
    if tp is bool and not isinstance(value, bool):
        raise CatnetError(f"config key '{name}' must be true/false, got {value!r}")
    if tp in (int, float) and not isinstance(value, bool):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise CatnetError(f"config key '{name}' must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise CatnetError(f"config key '{name}' must be an integer, got {value!r}")
        return out
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return origin(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys with a one-line error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CatnetError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in data.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CatnetError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CatnetError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CatnetError(f"config file {path} must hold a mapping at top level")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
