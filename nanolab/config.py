"""YAML experiment configs -> validated (nested) dataclasses.

    cfg = load_config("exp.yaml", ExperimentConfig, ["--training.num_steps", "100", "--eval.eval_on_load=false"])

Three steps, each failing with one error that names the file and the key path:

1. YAML (pyyaml safe_load), then `${VAR}` / `${VAR:-default}` substitution inside string values from the
   environment (a missing variable without a default is an error naming it; `$${VAR}` is a literal `${VAR}`).
   Substitution runs on parsed values, so comments and keys are never touched.
2. Dotted overrides `--a.b.c VALUE`, `--a.b.c=VALUE` or `a.b.c=VALUE`; an integer part indexes a list
   (`--experiments.0.seed 3`).
3. Validation against the schema dataclass: unknown keys (`training.num_stepz: unknown key (known: ...)`), missing
   required keys (fields without a default) and wrong types are errors. Supported field types: bool, int, float
   (an int is accepted), str, Literal[...], X | None, list[X], dict[str, X], nested dataclasses, and unions of
   dataclasses told apart by a Literal `type` field (`- type: add-texts-from-file`).

Strings that came from the environment or the command line are read as YAML scalars of the field's type
(`--training.num_steps 100` is the int 100, `--name 007` stays the string "007" for a str field). A float field
also takes exponent notation without a dot (`lr: 1e-4`), which PyYAML's YAML 1.1 rules read as a string.
A dataclass's __post_init__ may raise ValueError for range checks; the message gets the key path prepended.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import UsageError

T = TypeVar("T")

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_ENV_RE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(UsageError):
    """A bad config: the message names the file (or "overrides") and the key path."""


class _Scalar(str):
    """A string from the environment or the command line: read as a YAML scalar of the target field's type."""


# ----------------------------------------------------------------------------- environment substitution


def substitute_env(value: Any, where: str = "<config>", env: Mapping[str, str] | None = None,
                   _path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree (dicts, lists, scalars).

    A string holding a reference becomes a _Scalar, so `num_steps: ${STEPS}` validates as an int."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: substitute_env(v, where, env, _join(_path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, where, env, _join(_path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m: re.Match) -> str:
        escaped, name, default = m.group(1), m.group(2), m.group(3)
        if escaped:  # $${VAR} -> literal ${VAR}
            return m.group(0)[1:]
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: {_path or '<root>'}: environment variable ${{{name}}} is not set "
                          f"(set it, or write ${{{name}:-default}})")

    return _Scalar(_ENV_RE.sub(repl, value))


# ----------------------------------------------------------------------------- overrides


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c=x', 'd.e=2'] -> [('a.b', '1'), ('c', 'x'), ('d.e', '2')]."""
    out, i, args = [], 0, list(args)
    while i < len(args):
        a = args[i]
        key = a[2:] if a.startswith("--") else a
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif a.startswith("--") and i + 1 < len(args):
            val = args[i + 1]
            i += 2
        else:
            raise ConfigError(f"overrides: {a!r} has no value (write --key.path VALUE or key.path=VALUE)")
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"overrides: bad key path {key!r} in {a!r}")
        out.append((key, val))
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set dotted key paths in a (copied) YAML tree; values become _Scalar (typed at validation).

    Missing intermediate mappings are created, so an override may add a key the file left out; unknown keys are
    then reported by validation like any other."""
    data = _copy(data)
    for key, val in parse_overrides(overrides):
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(f"overrides: {here}: {part!r} is not an index of a list of {len(node)}")
                idx: Any = int(part)
            elif isinstance(node, dict):
                idx = part
            else:
                raise ConfigError(f"overrides: {here}: {'.'.join(parts[:depth])} is a "
                                  f"{type(node).__name__}, not a mapping")
            if last:
                node[idx] = _Scalar(val)
            else:
                if isinstance(node, dict) and node.get(idx) is None:
                    node[idx] = {}
                node = node[idx]
    return data


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


# ----------------------------------------------------------------------------- validation


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {path or '<root>'}: {msg}")


def _describe(v: Any) -> str:
    return f"{type(v).__name__} {v!r:.80}"


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check/convert one YAML value against a type annotation; raise ConfigError naming path."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Scalar):
        if tp is str or (origin is Literal and str(value) in typing.get_args(tp)):
            return str(value)
        if origin in (Union, types.UnionType) and str in typing.get_args(tp):
            return str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            value = str(value)
        if isinstance(value, (dict, list)) and not (origin in (list, dict) or dataclasses.is_dataclass(tp)):
            raise _fail(where, path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, where)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _fail(where, path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, path, f"expected {_type_name(tp)}, got null")
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(value, rest[0], path, where)
        if all(dataclasses.is_dataclass(a) for a in rest):
            return _build(_pick_variant(rest, value, path, where), value, path, where)
        for a in rest:
            try:
                return _convert(value, a, path, where)
            except ConfigError:
                pass
        raise _fail(where, path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise _fail(where, path, f"expected a list, got {_describe(value)}")
        return [_convert(v, item, _join(path, i), where) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise _fail(where, path, f"expected a mapping, got {_describe(value)}")
        return {str(k): _convert(v, item, _join(path, k), where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):  # PyYAML reads 1e-4 as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise _fail(where, path, f"unsupported annotation {tp!r} in the schema")
    hint = " (quote it in the YAML)" if tp is str and isinstance(value, (int, float, bool)) else ""
    raise _fail(where, path, f"expected {_type_name(tp)}, got {_describe(value)}{hint}")


def _pick_variant(classes: list[type], value: Any, path: str, where: str) -> type:
    """Among dataclasses with a Literal `type` field, the one whose literal matches value['type']."""
    if not isinstance(value, dict):
        raise _fail(where, path, f"expected a mapping with a 'type' key, got {_describe(value)}")
    by_type = {}
    for c in classes:
        hint = typing.get_type_hints(c).get("type")
        if typing.get_origin(hint) is not Literal:
            raise _fail(where, path, f"schema error: {c.__name__} needs a Literal 'type' field to be in a union")
        for lit in typing.get_args(hint):
            by_type[lit] = c
    t = value.get("type")
    if t not in by_type:
        got = "no 'type' key" if "type" not in value else f"type {t!r}"
        raise _fail(where, _join(path, "type"), f"{got}; known types: {', '.join(map(str, by_type))}")
    return by_type[t]


def _build(cls: type[T], data: Any, path: str, where: str) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _fail(where, path, f"expected a {cls.__name__} mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            raise _fail(where, _join(path, k), f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name), where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(where, _join(path, name), "missing required key")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise _fail(where, path, str(e)) from e


def from_dict(schema_cls: type[T], data: Any, where: str = "<config>") -> T:
    """Validate a YAML tree into an instance of the dataclass schema_cls (see the module docstring)."""
    if not dataclasses.is_dataclass(schema_cls):
        raise TypeError(f"schema_cls must be a dataclass, got {schema_cls!r}")
    return _build(schema_cls, data, "", where)


def to_dict(cfg: Any) -> Any:
    """A dataclass instance -> plain dicts/lists/scalars (yaml.safe_dump-able)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def dump_config(cfg: Any) -> str:
    """YAML text of a config, keys in schema order (what a run folder keeps as config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def load_config(path: str | os.PathLike, schema_cls: type[T], overrides: Sequence[str] = (),
                env: Mapping[str, str] | None = None) -> T:
    """Read YAML at `path`, substitute ${VAR}s, apply dotted overrides, validate into schema_cls."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    data = substitute_env(data, str(path), env)
    where = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{path} (with overrides)"
    return from_dict(schema_cls, data, where)
