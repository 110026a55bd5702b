"""The message schema (proto/schema.json) as fast checks.

Every message a NexRL node sends is checked here before encoding (`check_outgoing`): a type
missing from the schema, a missing required field or an undeclared field is a bug in the
sender and raises `SchemaError` — so there is no undocumented traffic. Every message a node
receives is checked by `check_incoming`: unknown fields are ignored (minor-version
compatibility), a missing or mistyped field is refused with an `invalid_body` error reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Callable

import numpy as np


class SchemaError(ValueError):
    """A message that breaks the schema; `code` is the wire error code, the text says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


Checker = Callable[[Any], bool]


def _is_array(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    return type(v).__module__ == "torch" and type(v).__name__ == "Tensor"


def _any(v: Any) -> bool:
    return True


_ABSENT = object()

# Each check tries the exact builtin type first: msgpack decodes to exact builtins, and
# `type(v) is T` is much cheaper than isinstance with a tuple (every message runs these).
_INTEGER, _NUMBER = (int, np.integer), (int, float, np.integer, np.floating)

_BASE: dict[str, Checker] = {
    "str": lambda v: type(v) is str or isinstance(v, str),
    "int": lambda v: type(v) is int or (isinstance(v, _INTEGER) and not isinstance(v, bool)),
    "float": lambda v: type(v) is float or type(v) is int or (
        isinstance(v, _NUMBER) and not isinstance(v, bool)),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "bytes": lambda v: isinstance(v, (bytes, bytearray, memoryview)),
    "array": _is_array,
    "any": _any,
    "map": lambda v: type(v) is dict or isinstance(v, dict),
    "list": lambda v: type(v) is list or isinstance(v, (list, tuple)),
}


def _list_of(inner: Checker) -> Checker:
    def check(v: Any) -> bool:
        if type(v) is not list and not isinstance(v, (list, tuple)):
            return False
        for x in v:
            if not inner(x):
                return False
        return True
    return check


def _map_of(inner: Checker) -> Checker:
    def check(v: Any) -> bool:
        if type(v) is not dict and not isinstance(v, dict):
            return False
        for k, x in v.items():
            if (type(k) is not str and not isinstance(k, str)) or not inner(x):
                return False
        return True
    return check


def _checker(type_name: str) -> Checker:
    if type_name in _BASE:
        return _BASE[type_name]
    for outer, wrap in (("list[", _list_of), ("map[", _map_of)):
        if type_name.startswith(outer) and type_name.endswith("]"):
            return wrap(_checker(type_name[len(outer):-1]))
    raise ValueError(f"proto/schema.json: unknown field type {type_name!r}")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str
    required: bool
    nullable: bool
    check: Checker


@dataclass(frozen=True, slots=True)
class MessageSpec:
    type: str
    kind: str  # request | reply | event
    reply: str | None
    fields: tuple[Field, ...]
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class Schema:
    version: str
    messages: dict[str, MessageSpec]
    raw: dict[str, Any]

    def spec(self, mtype: str) -> MessageSpec:
        try:
            return self.messages[mtype]
        except KeyError:
            raise SchemaError("unknown_type", f"message type {mtype!r} is not in proto/schema.json") from None


def parse_schema(raw: dict[str, Any]) -> Schema:
    messages = {}
    for mtype, m in raw["messages"].items():
        fields = tuple(
            Field(name, f["type"], bool(f.get("required", False)), bool(f.get("nullable", False)),
                  _checker(f["type"]))
            for name, f in m.get("fields", {}).items())
        if m["kind"] not in ("request", "reply", "event"):
            raise ValueError(f"proto/schema.json: {mtype} has unknown kind {m['kind']!r}")
        messages[mtype] = MessageSpec(mtype, m["kind"], m.get("reply"), fields,
                                      frozenset(f.name for f in fields))
    return Schema(raw["version"], messages, raw)


@lru_cache(maxsize=1)
def load_schema() -> Schema:
    """The schema shipped with this package (proto/schema.json)."""
    text = resources.files("nexrl.proto").joinpath("schema.json").read_text(encoding="utf-8")
    return parse_schema(json.loads(text))


# Hot path: every message sent and received goes through one of the two checks below, so
# the spec table is looked up in a plain dict (no lru_cache call per message) and fields of
# type `any` skip the type test.
_SPECS: dict[str, MessageSpec] | None = None


def _spec(mtype: str) -> MessageSpec:
    global _SPECS
    specs = _SPECS
    if specs is None:
        specs = _SPECS = load_schema().messages
    spec = specs.get(mtype)
    if spec is None:
        raise SchemaError("unknown_type", f"message type {mtype!r} is not in proto/schema.json")
    return spec


def _check_fields(spec: MessageSpec, body: dict[str, Any]) -> None:
    for f in spec.fields:
        v = body.get(f.name, _ABSENT)
        if v is _ABSENT:
            if f.required:
                raise SchemaError("invalid_body", f"{spec.type}: required field {f.name!r} is missing")
            continue
        if v is None:
            if not f.nullable:
                raise SchemaError("invalid_body", f"{spec.type}: field {f.name!r} must not be nil")
            continue
        if f.check is not _any and not f.check(v):
            raise SchemaError("invalid_body", f"{spec.type}: field {f.name!r} must be {f.type}, "
                                              f"got {type(v).__name__}")


def check_outgoing(mtype: str, body: dict[str, Any]) -> MessageSpec:
    """Refuse (SchemaError) a message this process is about to send that the schema lacks."""
    spec = _spec(mtype)
    if not isinstance(body, dict):
        raise SchemaError("invalid_body", f"{mtype}: body must be a dict, got {type(body).__name__}")
    if not spec.names.issuperset(body):
        extra = sorted(str(k) for k in body.keys() - spec.names)
        raise SchemaError("invalid_body", f"{mtype}: fields {extra} are not declared in "
                                          f"proto/schema.json (declare them there first)")
    _check_fields(spec, body)
    return spec


def check_incoming(mtype: str, body: dict[str, Any]) -> MessageSpec:
    """Check a received body; unknown fields are allowed (newer minor versions add fields)."""
    spec = _spec(mtype)
    _check_fields(spec, body)
    return spec
