"""Typed dataclass configs: built from YAML presets, run.json and command-line flags, checked in one place.

There is no global config object: each job takes its dataclass explicitly, and configs compose (an
`ExtractConfig` holds a `ClipSampling` and a `SpatialConfig`; a demo holds synth, extract and train
configs), so no field is spelled twice.

- A field's constraints live in its metadata (`field(default=..., metadata=spec(ge=1))`);
  `check_fields(cfg)`, called from each config's `__post_init__`, applies them, and every float must be
  finite unless its spec says otherwise.
- `from_dict(cls, data)` builds a config from plain data (YAML, JSON), recursing into nested configs,
  refusing unknown keys and values of the wrong type with one line.
- `add_flags(parser, cls, flags)` / `apply_flags(args, flags, data)`: the one mapping from a config to
  argparse options, a flag table `{"--clips": Flag("sampling.num_clips", "clips per video")}` per verb.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from catnet.errors import CatnetError, quoted

T = TypeVar("T")

# ------------------------------------------------------------------------------------------ checks


def spec(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, choices: tuple | None = None, finite: bool = True) -> dict[str, Any]:
    """Field metadata: the bounds and choices `check_fields` enforces (floats must be finite by default)."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "finite": finite}


def check_value(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """One-line CatnetError when `value` breaks the spec `meta` (see `spec`); None passes."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and meta.get("finite", True) and not math.isfinite(value):
        raise CatnetError(f"{name} must be a finite number, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise CatnetError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    if not isinstance(value, (int, float)):
        return
    for key, ok, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                          ("lt", operator.lt, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise CatnetError(f"{name} must be {word} {bound:g}, got {value!r}")


def check_fields(cfg: Any) -> None:
    """Apply every field's `spec` metadata to the dataclass instance `cfg`."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata:
            check_value(f.name, value, f.metadata)
        elif isinstance(value, float) and not math.isfinite(value):
            raise CatnetError(f"{f.name} must be a finite number, got {value!r}")


# ------------------------------------------------------------------------------------------ plain data


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0]) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise CatnetError(f"config key '{name}' must be a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise CatnetError(f"config key '{name}' must be true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise CatnetError(f"config key '{name}' must be {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise CatnetError(f"config key '{name}' must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise CatnetError(f"config key '{name}' must be an integer, got {value!r}")
        if tp is int and not -2**63 <= out < 2**63:  # what torch, numpy and the OS can take
            raise CatnetError(f"config key '{name}' must be an integer of at most 63 bits, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise CatnetError(f"config key '{name}' must be a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise CatnetError(f"config key '{name}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise CatnetError(f"config key '{name}' must have {len(args)} items, got {value!r}")
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(f"{name}[]", v, item) for v in value]
        return origin(items)
    if origin is dict and not isinstance(value, Mapping):
        raise CatnetError(f"config key '{name}' must be a mapping, got {value!r}")
    return value


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` deep-merged onto `base`: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrongly typed values with a
    one-line error. A nested config given as a partial mapping is merged over that field's default, so a
    preset spells only what it changes."""
    if not isinstance(data, Mapping):
        raise CatnetError(f"a {cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        names = ", ".join(quoted(prefix + str(k)) for k in unknown)
        raise CatnetError(f"unknown {cls.__name__} key(s): {names}; known: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CatnetError(f"{cls.__name__} needs key(s): {', '.join(prefix + n for n in missing)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for k, v in data.items():
        default = _default(fields[k])
        if isinstance(v, Mapping) and dataclasses.is_dataclass(default):
            v = merge(to_dict(default), v)
        values[k] = _coerce(prefix + k, v, hints[k])
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (tuples as lists, as they come back from JSON)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes
    (a "billion laughs" file), and no preset needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise CatnetError(f"YAML aliases (*name) are not allowed in configs (line {mark.line + 1})")
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; one-line errors for a missing file, bad YAML, aliases or non-mappings."""
    path = Path(path)
    if not path.is_file():
        raise CatnetError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)
    except yaml.YAMLError as e:
        raise CatnetError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise CatnetError(f"config file {path} is not UTF-8 text") from None
    if data is None:  # an empty file (or only comments)
        return {}
    if not isinstance(data, dict):
        raise CatnetError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    return data


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML scalars or lists (4 -> int, true -> bool, [1,2] -> list)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CatnetError(f"{flag} expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.load(value, Loader=_NoAliasLoader) if value.strip() else ""
        except (yaml.YAMLError, CatnetError):
            out[key.strip()] = value
    return out


# ------------------------------------------------------------------------------------------ CLI flags


@dataclass(frozen=True)
class Flag:
    """A command-line option for config field `key` (dotted for nested configs: "sampling.clip_len")."""

    key: str
    help: str = ""
    choices: tuple | None = None  # narrower than the field's own (argparse's "invalid choice")


def _field(cls: type, key: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field and type hint that a dotted key names."""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hint = typing.get_type_hints(cls)[head]
    if not rest:
        return fields[head], hint
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return _field(args[0], rest)


def _scalar(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
              flags: Mapping[str, Flag]) -> None:
    """One argparse option per flag, typed from the config field; default None = "not given"."""
    for flag, f in flags.items():
        field, hint = _field(cls, f.key)
        tp = _scalar(hint)
        dest = f.key.replace(".", "__")
        if tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=f.help)
        elif typing.get_origin(tp) is tuple:
            item = typing.get_args(tp)[0]
            parser.add_argument(flag, dest=dest, nargs=len(typing.get_args(tp)), type=item, default=None,
                                metavar=tuple(x.upper() for x in ("low", "high")), help=f.help)
        else:
            choices = f.choices or (field.metadata.get("choices") if field.metadata else None)
            parser.add_argument(flag, dest=dest, type=tp if tp in (int, float) else str, default=None,
                                choices=choices, help=f.help)


def apply_flags(args: argparse.Namespace, cls: type, flags: Mapping[str, Flag],
                data: dict[str, Any]) -> dict[str, Any]:
    """`data` (plain, possibly nested) updated with every flag given on the command line; each value is
    checked against its field's spec under the flag's own name, so errors say what the user typed."""
    for flag, f in flags.items():
        value = getattr(args, f.key.replace(".", "__"), None)
        if value is None:
            continue
        field, _ = _field(cls, f.key)
        check_value(flag, value, field.metadata or {})
        node = data
        *parents, last = f.key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CatnetError(f"config key '{p}' must be a mapping")
        node[last] = list(value) if isinstance(value, tuple) else value
    return data
