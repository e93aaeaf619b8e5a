"""Configs: plain TOML loaded into dataclasses, for the pipeline and the trainer alike.

``load_config(cls, path, overrides)`` reads TOML, applies ``--set section.key=value`` overrides,
builds the dataclass ``cls`` (``from_dict``: unknown keys, wrong types and non-finite numbers are
errors) and calls every nested ``validate()``. Every problem is a ``ConfigError`` with a one-line
message naming the key, raised before any work starts. ``config_hash`` is the sha256 of the
canonical JSON of a resolved config. Depends on the standard library only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from common.errors import UserError, one_line  # noqa: F401 - one_line is re-exported

T = TypeVar("T")


class ConfigError(UserError):
    """A config problem; its message is one line that names the key."""


# ----------------------------------------------------------------------------- generic loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # programming error


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict; unknown keys and missing required keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown key '{name}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as a TOML value, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
        raise ConfigError(f"--set '{text}': bad key '{key}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``a.b=value`` override set (creating tables)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{text}': '{k}' is not a table")
        node[keys[-1]] = value
    return data


def validate(obj: Any) -> None:
    """Call ``validate()`` on every nested dataclass (children first)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        children = value.values() if isinstance(value, dict) else [value]
        for child in children:
            if dataclasses.is_dataclass(child):
                validate(child)
    if hasattr(obj, "validate"):
        obj.validate()


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> T:
    """Load TOML ``path`` (or ``base``), apply ``--set`` overrides, build and validate ``cls``."""
    data = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    cfg = from_dict(cls, apply_overrides(data, list(overrides)))
    validate(cfg)
    return cfg


def config_hash(obj: Any) -> str:
    """sha256 (hex, first 16 chars) of the canonical JSON of a config dataclass or dict."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# split names: lowercase letters, digits and '_' (the pipeline's and the trainer's)
SPLIT_NAME = re.compile(r"[a-z0-9_]+")


# ----------------------------------------------------------------------------- TOML writer


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: {value} cannot be written to TOML")
        return repr(value)  # shortest repr that round-trips; TOML reads 1e-05 and 0.001
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    raise ConfigError(f"{where}: cannot write {type(value).__name__} to TOML")


def to_toml(data: dict) -> str:
    """Write a dict of tables (nested dicts of scalars and lists) as TOML text.

    Enough for configs: what tomllib reads back equals ``data`` exactly.
    """
    lines: list[str] = []

    def table(prefix: str, node: dict) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and (scalars or not node):
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value, f'{prefix}.{key}' if prefix else key)}")
        if prefix and (scalars or not node):
            lines.append("")
        for key, value in node.items():
            if isinstance(value, dict):
                table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
