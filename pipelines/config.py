"""Typed job configs: dataclass defaults, then a YAML file, then CLI flags, in that order."""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config type."""


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, name) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return build(tp, value, prefix=f"{name}.")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v] if args and args[0] is int else value.split(",")
        items = [_coerce(args[0] if args else Any, v, name) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from exc
    return value


def build(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a (nested) mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def merge(cls: type[C], base: C, values: dict[str, Any]) -> C:
    """Return `base` with the (nested) mapping `values` applied on top."""
    current = to_dict(base)
    _deep_update(current, values)
    return build(cls, current)


def _deep_update(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def load(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults of `cls`, then the YAML file at `path`, then `overrides` (dotted keys allowed)."""
    cfg = cls()
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        cfg = merge(cls, cfg, data)
    if overrides:
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            node = nested
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        cfg = merge(cls, cfg, nested)
    return cfg


def require(cfg: Any, labels: dict[str, str]) -> None:
    """Raise ConfigError naming every required field of `cfg` that is empty ({flag label: field})."""
    missing = [label for label, name in labels.items() if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (give them as arguments or in --config)")


def overrides_from_args(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """Collect CLI flags that were given (not None) into dotted config keys via `mapping`."""
    out = {}
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out
