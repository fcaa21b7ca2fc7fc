"""Typed job configs: dataclass defaults, then a YAML file, then CLI flags, in that order.

Configs are frozen stdlib dataclasses next to the code that uses them; pydantic validates them
(strictly: "5" is not an int, a list is not a string) and names the dotted key at fault. Each
command's flags are generated from its config's fields: the help comes from `option(...)`
metadata, the default is appended from the dataclass itself, and `Flag` reaches nested fields.

Numeric ranges are pydantic constraints in the field's annotation (`PositiveInt`,
`Annotated[int, Interval(ge=1, le=100)]`); a library config nested in a job config checks its own
invariants in `__post_init__`, raising `ValueError("field: reason")`. Either way a bad value is a
ConfigError naming the key (and, from the command line, the flag) before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, NamedTuple, TypeVar

import pydantic
import yaml
from annotated_types import Interval
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from matting_core import storage

C = TypeVar("C")

# first the constrained types job configs declare their numeric fields with
__all__ = ["Annotated", "Interval", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt",
           "ConfigError", "Flag", "option", "from_dict", "load", "apply_overrides", "is_job_spec", "to_dict",
           "require", "add_command", "from_args"]

_DEST = "cfg:"  # argparse dests holding config values start with this, then the dotted key


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config type.

    `problems` holds (dotted key, what is wrong) pairs, so the CLI can name its flags instead.
    """

    def __init__(self, message: str, problems: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.problems = problems


class Flag(NamedTuple):
    """A flag for a nested field (`--frames` for `fakemotion.frames`), whose class carries no help."""

    flag: str
    key: str
    help: str
    metavar: str | None = None


def option(default: Any, help: str, *, metavar: str | None = None, flags: tuple[str, ...] = (),
           positional: bool = False, repeat: bool = False, cli: bool = True) -> Any:
    """A dataclass field with its flag's help and, where it differs from `--field-name`, its spelling.

    Args:
        default: the field's default (immutable: configs are frozen).
        help: the flag's help; the default is appended automatically.
        metavar: the value's name in --help.
        flags: option strings instead of `--field-name` (e.g. `("-o", "--out")`).
        positional: an optional positional argument (`metavar` is its name) instead of a flag.
        repeat: a repeatable flag, each occurrence one item, instead of one comma-separated value.
        cli: False for a YAML-only key.
    """
    meta = {"help": help, "metavar": metavar, "flags": flags, "positional": positional, "repeat": repeat, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


# --- building and validating -------------------------------------------------------------------

@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Validate a (nested) mapping into `cls`; missing keys take their defaults."""
    # JSON mode: strict there still takes arrays for tuples and objects for nested dataclasses.
    blob = json.dumps(data, default=str)
    try:
        return _adapter(cls).validate_json(blob, strict=True, extra="forbid")
    except pydantic.ValidationError as exc:
        problems = tuple(_describe(cls, err) for err in exc.errors())
        raise ConfigError("; ".join(f"{k}: {why}" for k, why in problems), problems) from None


def _describe(cls: type, err: dict) -> tuple[str, str]:
    """(dotted key, what is wrong) of one pydantic error."""
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = [f.name for f in dataclasses.fields(_type_at(cls, ".".join(map(str, err["loc"][:-1]))))]
        return key, f"unknown key (known there: {', '.join(known)})"
    if err["type"] == "value_error":
        # a nested library config's own check: ValueError("field: reason") names its field
        inner = str(err.get("ctx", {}).get("error", err["msg"]))
        field_name, sep, why = inner.partition(": ")
        if sep and field_name.isidentifier():
            return f"{key}.{field_name}" if key else field_name, why
        return key, inner
    if err["type"] == "missing" and err["loc"] and isinstance(err["loc"][-1], int):
        return _root(key), f"too few values (e.g. 512x288 for a size), got {err['input']!r}"
    return key, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {err['input']!r}"


def load(cls: type[C], uri: str | Path | None = None, overrides: dict[str, Any] | None = None,
         command: str | None = None) -> C:
    """Defaults of `cls`, then the YAML file at `uri` (any storage URI), then `overrides` (dotted keys).

    The file may also be a job spec (`jobs/*.yaml`: top-level `command` and `config`): its `config`
    is used, and a spec of another command than `command` (when given) is refused.
    """
    data = _read_yaml(str(uri), command) if uri else {}
    return from_dict(cls, apply_overrides(data, overrides or {}))


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with each dotted key of `overrides` set (nested mappings made as needed); changes `data` in place."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return data


def is_job_spec(data: Any) -> bool:
    """Whether a YAML document is a job spec (DESIGN.md "Job specs") rather than a plain config."""
    return isinstance(data, dict) and "command" in data and "config" in data


def _spec_config(uri: str, spec: dict[str, Any], command: str | None) -> dict[str, Any]:
    """The `config` mapping of job spec `spec`, refused when it is for another command."""
    if command is not None and spec["command"] != command:
        raise ConfigError(f"{uri}: a job spec for `matting {spec['command']}`, not `matting {command}`")
    config = spec["config"]
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{uri}: the job spec's `config` must be a mapping")
    return config


def _read_yaml(uri: str, command: str | None = None) -> dict[str, Any]:
    try:
        data = yaml.safe_load(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ConfigError(f"{uri}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{uri}: cannot read the config file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{uri}: expected a YAML mapping at the top level")
    if is_job_spec(data):
        return _spec_config(uri, data, command)
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def require(cfg: Any, labels: dict[str, str]) -> None:
    """Raise ConfigError naming every required field of `cfg` that is empty ({flag label: field})."""
    missing = [label for label, name in labels.items() if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (give them as arguments or in --config)")


# --- the command line --------------------------------------------------------------------------

def add_command(subparsers, name: str, cls: type, run: Callable[[argparse.Namespace], int], *,
                help: str, description: str | None, epilog: str | None,
                nested: tuple[Flag, ...] = ()) -> argparse.ArgumentParser:
    """Register subcommand `name`: `--config`, one flag per field of `cls` and per `nested` Flag."""
    p = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml",
                   help=f"YAML file (local path or URI) with {cls.__name__} keys; flags override it")
    defaults, hints = cls(), typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    # the command's own fields first in --help, then those it shares through a base class
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if dataclasses.is_dataclass(hints[f.name]) or not f.metadata.get("cli", True):
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with option(..., help) or option(..., cli=False)")
        _add_flag(p, f.name, hints[f.name], getattr(defaults, f.name), f.metadata)
    for n in nested:
        value = functools.reduce(getattr, n.key.split("."), defaults)
        _add_flag(p, n.key, _type_at(cls, n.key), value, {"help": n.help, "metavar": n.metavar, "flags": (n.flag,)})
    p.set_defaults(run=run, config_class=cls, **{_FLAGS: _flag_names(p)})  # config_class: `matting submit` validates
    return p


_FLAGS = "cfg_flags"  # the parser default holding {dotted key: flag} for error messages


def _flag_names(p: argparse.ArgumentParser) -> dict[str, str]:
    return {a.dest[len(_DEST):]: (a.option_strings[-1] if a.option_strings else a.metavar or a.dest)
            for a in p._actions if a.dest.startswith(_DEST)}


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config of a parsed command line: defaults < `--config` < the flags given.

    A bad value is a ConfigError naming the flag (`--clips: input should be ...`), or the YAML
    key when it came from the file or has no flag.
    """
    given = {k[len(_DEST):]: v for k, v in vars(args).items() if k.startswith(_DEST) and v is not None}
    try:
        return load(cls, args.config, given, command=getattr(args, "command", None))
    except ConfigError as exc:
        if not exc.problems:
            raise
        flags = getattr(args, _FLAGS, {})
        named = tuple((_flag_for(key, flags) if _root(key) in given else key, why) for key, why in exc.problems)
        raise ConfigError("; ".join(f"{k}: {why}" for k, why in named), named) from None


def _root(key: str) -> str:
    """The dotted config key of `key` without list indices (`size[1]` -> `size`)."""
    return key.split("[", 1)[0]


def _flag_for(key: str, flags: dict[str, str]) -> str:
    return flags.get(_root(key), key)


def _add_flag(p: argparse.ArgumentParser, key: str, tp: Any, default: Any, meta: Mapping[str, Any]) -> None:
    """One argument for config key `key` of type `tp`, spelled and described as `meta` (see option)."""
    repeat, shown = meta.get("repeat", False), _shown(default)
    text = meta["help"] + (" (repeatable)" if repeat else "") + (f" (default: {shown})" if shown else "")
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}  # argparse expands %-formats in help
    if meta.get("positional"):
        p.add_argument(_DEST + key, nargs="?", metavar=meta["metavar"], type=_parser(tp, False)[0], **kwargs)
        return
    names = meta.get("flags") or ("--" + key.rsplit(".", 1)[-1].replace("_", "-"),)
    kwargs.update(dest=_DEST + key, default=None)  # None: not given, so the file or the default stands
    if _strip_none(tp) is bool:
        p.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    parse, choices = _parser(tp, repeat)
    # Without a metavar argparse would show the internal dest ("CFG:STEPS"); choices show themselves.
    metavar = meta.get("metavar") or (None if choices else key.rsplit(".", 1)[-1].upper())
    p.add_argument(*names, action="append" if repeat else "store", type=parse, choices=choices,
                   metavar=metavar, **kwargs)


def _parser(tp: Any, repeat: bool) -> tuple[Callable[[str], Any], tuple | None]:
    """(text -> value for argparse, choices) for a field type; pydantic checks the value after."""
    tp = _strip_none(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0]), args
    if origin in (tuple, list):
        item = args[0] if args else str
        if repeat:
            return _parser(item, False)[0], None
        return _split(item), None
    return tp, None


def _split(item: type) -> Callable[[str], tuple]:
    # numbers read as WxH or a,b (512x288); anything else as a comma-separated list (pha,fgr)
    def parse(text: str) -> tuple:
        parts = text.replace("x", ",").split(",") if item in (int, float) else text.split(",")
        try:
            return tuple(item(p.strip()) for p in parts if p.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {item.__name__}s separated by 'x' or ',', got {text!r}") from None
    return parse


def _shown(default: Any) -> str | None:
    """A default as the user would type it, or None where the help says what unset means."""
    if default is None or default == "" or default == ():
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (tuple, list)):
        numbers = all(isinstance(v, (int, float)) for v in default)
        return ("x" if numbers else ",").join(map(str, default))
    return str(default)


def _strip_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _type_at(cls: type, key: str) -> Any:
    """The annotated type of the dotted field `key` of dataclass `cls` ("" is `cls`)."""
    tp = cls
    for part in filter(None, key.split(".")):
        tp = typing.get_type_hints(tp)[part]
    return tp
