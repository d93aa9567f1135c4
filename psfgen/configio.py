"""Typed configs: frozen dataclasses loaded from YAML, with ``key=value`` overrides.

Every config class is a frozen dataclass whose fields carry their type. This module
turns a YAML mapping plus command-line overrides into an instance, coercing each value
to its field's type and rejecting unknown keys, so a typo fails at load time naming
the key instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import InputError

C = TypeVar("C")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to type ``tp`` or raise InputError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(key, value, a)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise InputError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise InputError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise InputError(f"config key '{key}': expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise InputError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"config key '{key}': expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool; str fields like "auto|true|false" want text
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise InputError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for '{key}'")


def build(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Instantiate ``cls`` from ``values``; unknown keys and bad values raise InputError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InputError(
            f"unknown key '{unknown[0]}' in {source}; valid keys are: {', '.join(names)}"
        )
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
    cfg = cls(**kwargs)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def parse_sets(sets: typing.Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-4``, ``true``)."""
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML raises InputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"config file {path} is not UTF-8 text; give a YAML file (e.g. configs/demo.yaml)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise InputError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of key: value")
    return data


def load(
    cls: type[C],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: typing.Iterable[str] = (),
) -> C:
    """Defaults < YAML file < explicit overrides (CLI options) < ``--set key=value``."""
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        values.update(read_yaml(path))
        source = str(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.update(parse_sets(sets))
    return build(cls, values, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the config (tuples become lists) for YAML/JSON."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def to_json(cfg: Any) -> str:
    """Canonical JSON of a config: sorted keys, so equal configs give equal text."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
