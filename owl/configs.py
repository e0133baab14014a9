"""Typed dataclass configs from plain dicts (a job file's sections, a model's config.json): the
one parser of every config. Each field is checked against its type hint (ints are accepted for
floats, lists for tuples, nested dataclasses from dicts); an error names the field's path
(`stage1.optimizer.lr: expected float, got str 'abc'`); a key a class lists in its `MOVED`
({old key: new place}) is refused with its new place. Plain Python: no torch, no Ray.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a dict, checking every field's type; errors name `path.field`."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "MOVED", {})  # {old key: its new place}, a layout that changed
    if any(k in moved for k in unknown):
        raise ValueError(
            "; ".join(f"{path}.{k} moved to {path}.{moved[k]}" for k in unknown if k in moved)
        )
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{path}.{name}: required field is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # the class's own checks (__post_init__)
        raise ValueError(f"{path}: {exc}") from exc


def coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` checked against type `tp` (ints are accepted for floats, lists for tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{path}: {value!r} is not allowed; expected one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, path)
    if origin in (list, tuple) or tp in (list, tuple):
        return _coerce_sequence(value, tp, origin or tp, args, path)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        value_tp = args[1] if args else Any
        return {k: coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, args: tuple, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    arms = [arm for arm in args if arm is not type(None)]
    errors = []
    for arm in arms:
        try:
            return coerce(value, arm, path)
        except ValueError as exc:
            errors.append(str(exc))
    if len(errors) == 1:  # `X | None`: the one type's own message
        raise ValueError(errors[0])
    # Each arm's reason without the path and value the line already starts with.
    reasons = [e.removeprefix(f"{path}: ").removeprefix(f"{value!r} ") for e in errors]
    raise ValueError(f"{path}: {value!r} matches none of: " + "; ".join(reasons))


def _coerce_sequence(value: Any, tp: Any, container: type, args: tuple, path: str) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if container is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ValueError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item_tp = args[0] if args else Any
    items = [coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if container is tuple else items


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (str, bool) and type(value) is tp:
        return value
    if tp is type(None) and value is None:
        return None
    plain = (int, float, str, bool, Path, type(None))
    if tp not in plain and isinstance(tp, type) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{path}: expected {name}, got {type(value).__name__} {value!r}")


# Field metadata of a config string that names an input file or folder the job must provide
# (a URL list, an instruction file): `field(default=..., metadata=INPUT_PATH)`.
INPUT_PATH = {"input_path": True}


def input_path_fields(config: Any, path: str) -> list[tuple[str, str]]:
    """(field path, value) of every INPUT_PATH field set in `config`, nested configs and lists
    of them included."""
    found: list[tuple[str, str]] = []
    if isinstance(config, list | tuple):
        for i, item in enumerate(config):
            found += input_path_fields(item, f"{path}[{i}]")
        return found
    if not dataclasses.is_dataclass(config):
        return found
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("input_path") and isinstance(value, str) and value:
            found.append((f"{path}.{f.name}", value))
        elif dataclasses.is_dataclass(value) or isinstance(value, list | tuple):
            found += input_path_fields(value, f"{path}.{f.name}")
    return found
