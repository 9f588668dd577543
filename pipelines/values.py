"""Typed values from YAML files and command lines, checked against a type hint.

A leaf: the run config's sections and a user's model's `init_args` are both read with it.
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Union

import yaml

from pipelines.errors import ConfigError


class Text(str):
    """A value typed on a command line: parsed as YAML unless the field wants a string."""


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as `hint` wants it (a command line's text parsed as YAML), or `ConfigError`
    naming `key`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if isinstance(value, Text) and value not in choices:
            value = yaml.safe_load(value)
        if value not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        items = typing.get_args(hint)
        item = items[0] if items else Any
        return tuple(coerce(value, list[item], key))
    if origin in (Union, types.UnionType):  # Optional[X], X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, Text) and value.lower() in ("none", "null", "")):
            return None
        return coerce(value, args[0], key)
    if isinstance(value, str) and hint in (int, float):
        try:
            number = hint(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            raise ConfigError(f"config key {key!r} expects {hint.__name__}, got {str(value)!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key {key!r} must be a finite number, got {str(value)!r}")
        return number
    if isinstance(value, Text) and hint is not str:
        if origin is list and "[" not in value:
            value = [Text(v.strip()) for v in value.split(",") if v.strip()]
        else:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"config key {key!r}: cannot parse {str(value)!r}") from None
    want = getattr(hint, "__name__", str(hint))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return str(value)
    else:
        return value
    raise ConfigError(f"config key {key!r} expects {want}, got {value!r}")


def flat_keys(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested dict (a list is one value)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_keys(value, dotted))
        else:
            out[dotted] = value
    return out


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s keys over it, section by section (neither is changed)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
