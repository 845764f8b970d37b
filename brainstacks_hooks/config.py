"""Typed configs from YAML, with dotted command-line overrides and strict keys.

A YAML file maps onto nested dataclasses: keys equal field names, an unknown key is an error that
suggests the closest valid one, and ``key.sub=value`` overrides (``train.max_steps=20``) are applied
before validation. Values in overrides are parsed as YAML scalars (``true``, ``3``, ``1e-4``, ``[a, b]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, TypeVar

import yaml

from .configs import resolve_config
from .errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _as_float(value: int | str, where: str) -> float:
    """``1e-4`` is a string in YAML 1.1 (PyYAML): accept it, and ints, where a float is declared."""
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` recursively; unknown keys raise :class:`ConfigError`."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(names)}"
            raise ConfigError(f"unknown config key {path + key!r}{hint}")
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        tp = _unwrap_optional(hints[key])
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, f"{path}{key}.")
        elif origin is list and value is not None:
            (item,) = typing.get_args(tp) or (Any,)
            item = _unwrap_optional(item)
            if dataclasses.is_dataclass(item):
                value = [from_dict(item, v, f"{path}{key}[{i}].") if isinstance(v, dict) else v
                         for i, v in enumerate(value)]
        elif origin is tuple and isinstance(value, list):
            value = tuple(value)
        elif tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = _as_float(value, f"{path}{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain JSON/YAML-ready structure."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (list items by index: ``domains.0.max_steps=5``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
        node: Any = data
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            where = ".".join(parts[:i]) or "the top level"
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is a list; {part!r} must be an index from 0 to "
                                      f"{len(node) - 1}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"override {item!r}: {where} is {node!r}, not a mapping")
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (or start empty), apply overrides and build ``cls``.

    ``path`` is a file or the name of a config shipped in the package (``"quickstart_cpu"``, see
    :mod:`brainstacks_hooks.configs`); an existing file wins.

    Raises:
        ConfigError: no such file or shipped config (the message lists the shipped ones), invalid YAML, an
            unknown key or a malformed override.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}{' with overrides' if overrides else ''}: {e}") from e
