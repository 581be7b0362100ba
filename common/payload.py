"""Payload: the catalogue attributes an image carries into search, and their one encoding.

Which attributes exist is configuration (``[payload] fields``: name -> ``string`` | ``bool``
| ``number``). A producer coerces what a catalogue row or CMS change gives it with
``PayloadSchema.coerce`` (a bad value is that row's or change's problem, named, never a
crash); the job carries the coerced mapping; the worker writes it into the segment as
``encode_payload`` bytes; the index keeps those bytes per image and the searcher turns them
into typed columns for filtering (``index.payload``). The image URL travels beside it, in
the job's ``url``.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import orjson

FieldType = Literal["string", "bool", "number"]
FIELD_TYPES: tuple[FieldType, ...] = ("string", "bool", "number")
PayloadValue = str | bool | float | None
Payload = Mapping[str, PayloadValue]

MAX_FIELDS = 64
MAX_STRING_CHARS = 1024
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


class PayloadError(ValueError):
    """A value that does not fit its field; the message names the field."""


@dataclass(frozen=True)
class PayloadSchema:
    """The configured attributes: name -> type."""

    fields: Mapping[str, FieldType]

    def __post_init__(self) -> None:
        if len(self.fields) > MAX_FIELDS:
            raise ValueError(f"at most {MAX_FIELDS} payload fields, got {len(self.fields)}")
        for name, kind in self.fields.items():
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"payload field name {name!r} must be letters, digits and _")
            if kind not in FIELD_TYPES:
                raise ValueError(
                    f"payload field {name!r}: type {kind!r} is not one of {FIELD_TYPES}"
                )

    def __bool__(self) -> bool:
        return bool(self.fields)

    def coerce_value(self, name: str, value: object) -> PayloadValue:
        """``value`` as field ``name`` stores it; None / "" are "not given"."""
        kind = self.fields.get(name)
        if kind is None:
            raise PayloadError(f"{name}: not a payload field (configured: {sorted(self.fields)})")
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if kind == "string":
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise PayloadError(f"{name}: expected a string, got {type(value).__name__}")
            text = value if isinstance(value, str) else _number_text(value)
            if len(text) > MAX_STRING_CHARS:
                raise PayloadError(f"{name}: {len(text)} characters; at most {MAX_STRING_CHARS}")
            return text
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str):
                word = value.strip().lower()
                if word in _TRUE:
                    return True
                if word in _FALSE:
                    return False
            raise PayloadError(f"{name}: expected true or false, got {value!r}")
        # number
        if isinstance(value, bool):
            raise PayloadError(f"{name}: expected a number, got a boolean")
        try:
            number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise PayloadError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise PayloadError(f"{name}: expected a finite number, got {value!r}")
        return number


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def encode_payload(payload: Payload | None) -> bytes:
    """Canonical bytes (sorted keys, no whitespace); b"" for no payload."""
    if not payload:
        return b""
    return orjson.dumps(dict(payload), option=orjson.OPT_SORT_KEYS)
