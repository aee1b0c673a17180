"""Typed JSON records: dataclasses read from and written to JSON objects, field by field.

A `Record` subclass declares its fields with type hints. `from_dict` builds it from a parsed
JSON object: a field typed as a record, or as a list or string-keyed dict of records, is
converted; a field typed as anything else (numbers, strings, a free-form ``dict``) is taken as it
is, only its shape checked where the hint names a list or a dict. `to_dict` gives the object back
with its keys in field order. Keys a class does not declare are kept in ``extra`` and written
after the declared ones, so reading and writing a file loses nothing.

A field made with `optional()` is left out of the object while it is None: it is written only
by the files that have it (a study without routes has no ``routes`` key). Every other field is
always written, null when None. Every field may be null or absent when read (older files lack
what was added since), so its type is ``X | None`` unless the class cannot exist without it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Self

from lorasum.errors import LorasumError

_OPTIONAL = "lorasum.records.optional"


class RecordError(LorasumError):
    """A JSON object that does not have a record's shape (says where, and what was expected)."""


def optional() -> Any:
    """A field written only while it is not None (``field(default=None)`` otherwise)."""
    return dataclasses.field(default=None, metadata={_OPTIONAL: True})


@dataclasses.dataclass(kw_only=True)
class Record:
    """A JSON object with declared fields; ``extra`` holds the keys it does not declare."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, obj: Any, where: str = "") -> Self:
        """The record of a parsed JSON object (``where``: its path, for error messages)."""
        if not isinstance(obj, dict):
            raise RecordError(f"{where or cls.__name__} is {_kind(obj)}, not an object")
        fields, hints = _fields(cls), _hints(cls)
        missing = [
            f.name
            for f in fields
            if f.name not in obj
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise RecordError(f"{where or cls.__name__} lacks {', '.join(missing)}")
        names = {f.name for f in fields}
        values = {
            n: _decode(obj[n], hints[n], f"{where}.{n}" if where else n) for n in names if n in obj
        }
        return cls(**values, extra={k: v for k, v in obj.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: declared fields in order (optional ones only when set), then
        ``extra``; nested records, lists and dicts are copies."""
        out = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if value is None and f.metadata.get(_OPTIONAL):
                continue
            out[f.name] = _encode(value)
        out.update(_encode(self.extra))
        return out


@functools.cache
def _fields(cls: type[Record]) -> tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.name != "extra")


@functools.cache
def _hints(cls: type[Record]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _decode(value: Any, hint: Any, where: str) -> Any:
    """``value`` (parsed JSON) as ``hint`` says: records built, lists and dicts of them walked."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _decode(value, inner[0], where) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where} is {_kind(value)}, not a list")
        return (
            [_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where} is {_kind(value)}, not an object")
        return {k: _decode(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else value
    return value


def _encode(value: Any) -> Any:
    """Plain JSON values: records as objects, tuples as lists, containers copied."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value
