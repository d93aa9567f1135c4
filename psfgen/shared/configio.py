"""Typed configs: frozen dataclasses loaded from YAML, with ``key=value`` overrides.

Every config class is a frozen dataclass whose fields carry their type. This module
turns a YAML mapping plus command-line overrides into an instance, coercing each value
to its field's type and rejecting unknown keys, so a typo fails at load time naming
the key instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from psfgen.shared.errors import InputError
from psfgen.shared.reading import read_user_file

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
                errors.append(exc)
        raise errors[0]
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML's `focus_m: 2`: one value
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError.for_key(key, f"must be a list, got {value!r}")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise InputError.for_key(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise InputError.for_key(key, f"must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise InputError.for_key(key, f"must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise InputError.for_key(key, f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError.for_key(key, f"must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool; str fields like "auto|true|false" want text
            return "true" if value else "false"
        if isinstance(value, (dict, list)):
            raise InputError.for_key(key, f"must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for '{key}'")


def unknown_key(key: str, names: list[str], source: str) -> InputError:
    """The error for a key ``cls`` does not have: the closest valid key, or all of them when none is close."""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"valid keys are: {', '.join(names)}"
    return InputError(f"unknown key '{key}' in {source}; {hint}")


def build(cls: type[C], values: dict[str, Any], source: str = "config", set_keys: typing.Iterable[str] = ()) -> C:
    """Instantiate ``cls`` from ``values``; unknown keys and bad values raise InputError.

    set_keys: the keys that came from ``--set``, so an unknown one is reported as such.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names), key=lambda k: (k not in set_keys, k))
    if unknown:
        raise unknown_key(unknown[0], names, "--set" if unknown[0] in set_keys else source)
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
        except RecursionError:
            raise InputError(f"--set {key}: the value is nested too deeply") from None
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last one without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad YAML raises InputError."""
    path = Path(path)
    try:
        text = read_user_file(path, "config file").decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"config file {path} is not UTF-8 text; give a YAML file (e.g. configs/demo.yaml)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise InputError(f"config file {path} gives key {exc.key!r} twice (line {exc.line}); keep one") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise InputError(f"config file {path} is not valid YAML{where}") from None
    except RecursionError:
        raise InputError(f"config file {path} is nested too deeply to be a config") from None
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
    from_sets = parse_sets(sets)
    values.update(from_sets)
    return build(cls, values, source, set_keys=from_sets)


# Checks that several configs share, in one wording: "config key 'seed' must be 0 or more, got -1".
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(cfg: Any, key: str = "device") -> None:
    value = getattr(cfg, key)
    if not isinstance(value, str) or not DEVICE.fullmatch(value):
        raise InputError.for_key(key, f"must be auto, cpu, cuda or cuda:K, got {value!r}")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit number


def check_seed(cfg: Any, key: str = "seed") -> None:
    value = getattr(cfg, key)
    if not 0 <= value <= MAX_SEED:
        raise InputError.for_key(key, f"must be between 0 and 2**63 - 1, got {value}")


def check_at_least(cfg: Any, lowest: float, *keys: str) -> None:
    """Each of ``keys`` (None allowed: 'not set') is at least ``lowest``."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not value >= lowest:
            bound = "0 or more" if lowest == 0 else f"at least {lowest}"
            raise InputError.for_key(key, f"must be {bound}, got {value}")


def check_grid_size(cfg: Any, key: str = "grid_size") -> None:
    """An N x N field grid needs N >= 2: its points span [-1, 1] from edge to edge."""
    check_at_least(cfg, 2, key)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of the config (tuples become lists) for YAML/JSON."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def to_json(cfg: Any) -> str:
    """Canonical JSON of a config: sorted keys, so equal configs give equal text."""
    return json.dumps(to_dict(cfg), sort_keys=True)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
