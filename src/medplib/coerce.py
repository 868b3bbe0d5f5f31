"""Plain data (JSON, YAML, `key=value` overrides) -> nested dataclasses, checked against their type hints,
and back (`plain`).

One coercer for the model config (`medplib.config`) and the training recipes
(`medplib.training.recipe`): unknown keys and values of the wrong type are errors that name the
dotted key, so a typo (`moe.gate="typo"`, `train.stepz=3`) fails where it is read, never later deep
inside the model. Written here rather than taken from a validation library (pydantic, dacite)
because the config classes stay plain dataclasses with no runtime dependency, and the messages
name keys the way the CLI's `key=value` overrides spell them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from medplib.errors import ConfigError


def build(cls: type, raw: Any, where: str, error: type[ConfigError] = ConfigError, kind: str = "config") -> Any:
    """`cls(**raw)` with every field coerced to its annotation; `where` is the dotted path of `raw`
    ("recipe", "recipe.train"), `kind` the word error messages use for a key ("recipe key")."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a section (mapping), got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise error(f"unknown {kind} key '{_key(f'{where}.{unknown[0]}')}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}", error, kind) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise error(f"{_key(where) or where}: {exc}") from None


def plain(value: Any) -> Any:
    """Nested dataclasses -> the plain data `build` reads back: only the fields that are keys (`init`);
    a derived field (init=False, e.g. a recipe's `upcycle.num_experts`) is left out, as `build` refuses it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _key(where: str) -> str:
    """"recipe.train.steps" -> "train.steps": keys as an override spells them."""
    return where.partition(".")[2]


def _coerce(value: Any, tp: Any, where: str, error: type[ConfigError], kind: str) -> Any:
    key = _key(where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, where, error, kind)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, error, kind)
    if origin is Literal:
        if value not in args:
            raise error(f"bad value for '{key}': {value!r} (choose from {', '.join(map(str, args))})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"bad value for '{key}': expected a list, got {value!r}")
        if origin is list:
            return [_coerce(v, args[0], f"{where}[{i}]", error, kind) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", error, kind) for i, v in enumerate(value))
        if len(value) != len(args):
            raise error(f"bad value for '{key}': expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]", error, kind) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"bad value for '{key}': expected a mapping, got {value!r}")
        return {str(k): (_coerce(v, args[1], f"{where}.{k}", error, kind) if args[1] is not Any else v)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"bad value for '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"bad value for '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"bad value for '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise error(f"bad value for '{key}': expected a string, got {value!r}")
        return str(value)
    raise error(f"'{key}': unsupported type {tp}")
