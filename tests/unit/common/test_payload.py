from __future__ import annotations

import pytest

from common.payload import PayloadError, PayloadSchema, encode_payload

SCHEMA = PayloadSchema({"brand": "string", "in_stock": "bool", "price": "number"})


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("brand", "Acme", "Acme"),
        ("brand", 42, "42"),
        ("in_stock", "yes", True),
        ("in_stock", "0", False),
        ("in_stock", True, True),
        ("price", "19.5", 19.5),
        ("price", 3, 3.0),
        ("price", "", None),
        ("brand", None, None),
    ],
)
def test_values_are_coerced_to_their_field_type(name: str, raw: object, expected: object) -> None:
    assert SCHEMA.coerce_value(name, raw) == expected


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("price", "cheap", "price: expected a number"),
        ("price", "nan", "price: expected a finite number"),
        ("price", True, "price: expected a number, got a boolean"),
        ("in_stock", "maybe", "in_stock: expected true or false"),
        ("colour", "red", "colour: not a payload field"),
    ],
)
def test_bad_values_name_their_field(name: str, raw: object, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        SCHEMA.coerce_value(name, raw)


def test_schema_refuses_bad_names_and_types() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        PayloadSchema({"a-b": "string"})
    with pytest.raises(ValueError, match="is not one of"):
        PayloadSchema({"a": "date"})  # type: ignore[dict-item]


def test_encoding_is_canonical() -> None:
    assert encode_payload({"price": 2.0, "brand": "x"}) == encode_payload(
        {"brand": "x", "price": 2.0}
    )
    assert encode_payload({}) == b""
