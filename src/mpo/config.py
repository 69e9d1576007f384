"""Typed configuration: dataclasses + YAML + dotted overrides.

A config is a tree of stdlib dataclasses. ``load_config(Cls, "run.yaml", ["train.lr=1e-5"])`` reads the
YAML with a safe loader, applies ``key.sub=value`` overrides (values parsed as YAML scalars), and builds
the dataclass tree, checking every value against its type hint. Nothing is silently ignored:

* an unknown key is an error that names it and the closest valid keys;
* a value of the wrong type names the key, the expected type and what was given;
* a value outside its range (field metadata ``ge``/``gt``/``le``/``lt``) names the key and the range.

Field docstrings are written as ``metadata={"help": ...}`` so that ``describe(Cls)`` can list them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from mpo.fsio import atomic_write_text

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "describe",
    "field",
    "load_config",
    "save_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration problem; the message always names the offending key."""


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None) -> Any:
    """``dataclasses.field`` with a help text and an optional numeric range."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------
# Building a dataclass tree from plain data


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, root: type | None = None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, root)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)} (got {value!r})")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=key, root=root)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" as a string; accept it as the number it obviously is.
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # inf or nan: no setting means it, and training turns it into a nan loss
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def _check_range(value: Any, meta: Any, key: str) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, ok, _sym in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            ranges = [f"{s} {meta[n]}" for n, _, s in checks if meta.get(n) is not None]
            raise ConfigError(f"{key}: must be {' and '.join(ranges)} (got {value!r})")


def _elsewhere(root: type, key: str) -> list[str]:
    """``section.key`` for every section of ``root`` that has a field ``key`` (a key put in the wrong section)."""
    hints = typing.get_type_hints(root)
    return [f"{f.name}.{key}" for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints.get(f.name))
            and key in {g.name for g in dataclasses.fields(hints[f.name])}]


def build(cls: type, data: dict[str, Any] | None, prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, validating keys, types and ranges (``root``: the top-level class,
    whose other sections are searched for a misplaced key)."""
    data = dict(data or {})
    root = root or cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            close = _elsewhere(root, str(key)) or difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys here: {valid})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        full = f"{prefix}.{name}" if prefix else name
        value = _coerce(data[name], hints[name], full, root)
        _check_range(value, f.metadata, full)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None
    for name, f in fields.items():  # defaults must also satisfy the ranges
        _check_range(getattr(obj, name), f.metadata, f"{prefix}.{name}" if prefix else name)
    return obj


# ----------------------------------------------------------------------------------------------------
# Overrides, loading, saving


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:  # includes !!python/... tags, which the safe loader refuses
            raise ConfigError(f"override {item!r}: not a YAML value: {str(exc).splitlines()[0]}") from None
        if isinstance(value, str) and "#" in raw and value != raw.strip():
            value = raw.strip()  # " #" started a YAML comment: a path like "run #3/meta.json" is meant whole
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        old = node.get(parts[-1])
        # a whole section given (train={learning_rate: 1e-6}) goes into the section, as its keys one by one would;
        # replacing it dropped every other setting of a preset's section without a word
        node[parts[-1]] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return data


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping (a second ``train:`` section, a repeated
    ``learning_rate:``) is an error: PyYAML keeps the last one and drops the first without a word."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # "<<: *anchor" merge keys, as the safe loader reads them
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise ConfigError(f"line {key_node.start_mark.line + 1}: a mapping key must be a name, not a "
                                  f"{type(key).__name__}")
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in one mapping "
                                  f"(first on line {seen[key]}); the second would replace the first")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:map", _UniqueKeyLoader.construct_mapping)  # every mapping
# Integers as YAML 1.2 reads them: YAML 1.1 (PyYAML) turns 010 into 8, 0x10 into 16 and 1:30 into 90, so a
# save_steps: 0200 silently meant 128. Decimal digits (leading zeros allowed) stay integers; the rest stays text,
# which an int setting then refuses by name.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"),
                                       list("-+0123456789"))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)
                                                                                     .replace("_", ""), 10))


def _load_yaml(text: str) -> Any:
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read YAML ``path`` (optional), apply ``overrides`` and build ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                              "save the config as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
        try:  # the safe loader, duplicate keys refused, YAML 1.2 integers
            loaded = _load_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML: {what}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        # a section whose keys are all commented out ("train:" alone) is an empty section
        data = {k: ({} if v is None else v) for k, v in (loaded or {}).items()}
    data = apply_overrides(data, list(overrides or []))
    return build(cls, data)


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain YAML-safe data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(obj: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field: used by ``mpo config-help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key))
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
