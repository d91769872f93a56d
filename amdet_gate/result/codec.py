"""Typed result <-> plain JSON data, and the JSON Schema of a type, all read from the type hints.

One walk over the dataclasses does the three jobs, so that the Python types, what `dump` writes,
what `load` accepts and `schemas/result.schema.json` cannot drift apart:

- `to_data(value)`: a frozen dataclass tree -> JSON data (enums as their values, tuples as lists,
  NaN and infinities as null, as result.json has always written them).
- `from_data(cls, data)`: JSON data (untrusted) -> the typed value, or `ResultError` naming the
  first key path that does not fit.
- `schema_of(cls)`: the JSON Schema (draft 2020-12) of the type.

Field metadata (`omit()`, `flat()`) covers the two shapes result.json has that a plain dataclass
has not: keys that are absent rather than null, and a group of keys written into the parent object.
A class may take over its own shape with `to_data`/`from_data`/`json_schema` (the gate table does).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

from amdet_gate.errors import UsageError

MAX_DEPTH = 32


class ResultError(UsageError):
    """A stored result that is not a well-formed result.json (exit 4, one line)."""


def omit(default: Any = None) -> Any:
    """A field whose key is left out of the JSON while it is None (an optional group of keys)."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


def flat() -> Any:
    """A dataclass-valued field whose keys are written into the parent object (None: none of them)."""
    return dataclasses.field(default=None, metadata={"flatten": True})


# --- typed -> data -------------------------------------------------------------------------------

def to_data(value: Any) -> Any:
    if hasattr(type(value), "to_data") and dataclasses.is_dataclass(value):
        return value.to_data()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("flatten"):
                if item is not None:
                    out.update(to_data(item))
            elif not (item is None and f.metadata.get("omit_none")):
                out[f.name] = to_data(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- data -> typed -------------------------------------------------------------------------------

def _where(path: tuple) -> str:
    return ".".join(map(str, path)) or "(top level)"


def _fail(path: tuple, message: str) -> ResultError:
    return ResultError(f"{_where(path)}: {message}")


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> bool:
    return _origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def from_data(tp: Any, data: Any, path: tuple = ()) -> Any:
    """`data` (untrusted JSON) as a value of type `tp`; ResultError names the first key that does not fit."""
    if len(path) > MAX_DEPTH:
        raise _fail(path, "nested too deep")
    origin = _origin(tp)
    if tp is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        errors = []
        for choice in choices:
            try:
                return from_data(choice, data, path)
            except ResultError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is type(None):
        if data is not None:
            raise _fail(path, "must be null")
        return None
    if tp is bool:
        if not isinstance(data, bool):
            raise _fail(path, "must be true or false")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise _fail(path, "must be an integer")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, int | float) or not math.isfinite(data):
            raise _fail(path, "must be a number")
        return data
    if tp is str:
        if not isinstance(data, str):
            raise _fail(path, "must be a string")
        return data
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise _fail(path, f"must be one of {allowed}") from None
    if origin is tuple:
        if not isinstance(data, list):
            raise _fail(path, "must be a list")
        item = typing.get_args(tp)[0]
        return tuple(from_data(item, v, (*path, i)) for i, v in enumerate(data))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(data, dict):
            raise _fail(path, "must be an object")
        value = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: from_data(value, v, (*path, k)) for k, v in data.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise _fail(path, "must be an object")
        if hasattr(tp, "from_data"):
            return tp.from_data(data, path)
        return _dataclass(tp, data, path)
    raise TypeError(f"no JSON form for {tp!r}")  # a programming error, never the input's


def _dataclass(cls: type, data: dict, path: tuple) -> Any:
    values = {}
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if f.metadata.get("flatten"):
            inner = _non_none(tp)
            keys = {g.name for g in dataclasses.fields(inner)}
            values[f.name] = from_data(inner, {k: v for k, v in data.items() if k in keys}, path) \
                if keys & data.keys() else None
        elif f.name in data:
            values[f.name] = from_data(tp, data[f.name], (*path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail((*path, f.name), "missing")
    return cls(**values)


def _non_none(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None)) if _is_optional(tp) else tp


# --- type -> JSON Schema -------------------------------------------------------------------------

def schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of `tp`; dataclasses go into `defs` (by class name) and are referenced."""
    origin = _origin(tp)
    if tp is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if set(args) == {int, float}:
            args = [float]
        parts = [schema_of(a, defs) for a in args]
        if nullable:
            parts.append({"type": "null"})
        return parts[0] if len(parts) == 1 else {"anyOf": parts}
    if tp is type(None):
        return {"type": "null"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if origin is tuple:
        return {"type": "array", "items": schema_of(typing.get_args(tp)[0], defs)}
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp)
        return {"type": "object"} | ({"additionalProperties": schema_of(args[1], defs)}
                                     if args and args[1] is not Any else {})
    if dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder: a type that refers to itself terminates
            defs[name] = tp.json_schema(defs) if hasattr(tp, "json_schema") else object_schema(tp, defs)
        return {"$ref": f"#/$defs/{name}"}
    raise TypeError(f"no JSON Schema for {tp!r}")


def object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    properties, required = _properties(cls, defs)
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        schema = {"description": " ".join(cls.__doc__.split())} | schema
    if required:
        schema["required"] = required
    return schema


def _properties(cls: type, defs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flatten"):
            inner, _ = _properties(_non_none(types_[f.name]), defs)
            properties.update(inner)
            continue
        properties[f.name] = schema_of(types_[f.name], defs)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    return properties, required
