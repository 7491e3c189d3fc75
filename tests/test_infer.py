import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamer.infer import COLUMN_TYPES, BadValue, converters_for, infer, parse_column_type


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        ("-3", -3),
        ("+7", 7),
        ("0", 0),
        ("1", 1),
        ("9223372036854775807", 9223372036854775807),
        ("18446744073709551615", 18446744073709551615),
        ("1.5", 1.5),
        (".5", 0.5),
        ("2.", 2.0),
        ("1e-3", 0.001),
        ("-2.5E+2", -250.0),
        ("1e5", 100000.0),
        ("true", True),
        ("FALSE", False),
        ("True", True),
        ("tRuE", True),
    ],
)
def test_numbers_and_booleans_get_their_json_type(text, expected):
    value = infer(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "abc",
        "1_000",
        " 12",
        "12 ",
        "nan",
        "NaN",
        "inf",
        "-Infinity",
        "١٢٣",
        "１２",
        "0x10",
        "1e",
        "e5",
        ".",
        "+",
        "1.2.3",
        "yes",
        "no",
        "t",
        "f",
        "18446744073709551616",
        "-9223372036854775809",
        "1e999",
        "--1",
    ],
)
def test_other_forms_stay_strings(text):
    assert infer(text) == text


def test_integers_encode_without_a_fraction():
    assert orjson.dumps({"m": infer("4096"), "u": infer("0")}) == b'{"m":4096,"u":0}'


@given(st.text(max_size=30))
def test_inference_always_yields_strict_json(text):
    value = infer(text)
    encoded = orjson.dumps(value)  # raises for values JSON cannot hold
    assert orjson.loads(encoded) == value
    if isinstance(value, float):
        assert math.isfinite(value)
    if isinstance(value, str):
        assert value == text


def test_forced_column_types():
    to_bool, to_int, to_float, to_str = (COLUMN_TYPES[t] for t in ("bool", "int", "float", "string"))
    assert [to_bool(v) for v in ("1", "0", "true", "FALSE", "yes", "off", "")] == [True, False, True, False, True, False, None]
    assert to_int("42") == 42 and to_int("") is None
    assert to_float("1") == 1.0 and type(to_float("1")) is float
    assert to_str("1") == "1"
    for convert, bad in ((to_bool, "maybe"), (to_int, "4.5"), (to_int, "nan"), (to_float, "inf"), (to_float, "abc")):
        with pytest.raises(BadValue):
            convert(bad)


def test_converters_force_only_named_columns():
    converters = converters_for(["gpu_id", "active"], {"active": "bool"})
    assert [c(v) for c, v in zip(converters, ["1", "1"])] == [1, True]


@pytest.mark.parametrize("spec, expected", [("active=bool", ("active", "bool")), ("a=b=INT", ("a=b", "int")), ("x=String", ("x", "string"))])
def test_parse_column_type(spec, expected):
    assert parse_column_type(spec) == expected


@pytest.mark.parametrize("spec", ["active", "=bool", "active=boolean", "active="])
def test_parse_column_type_rejects(spec):
    with pytest.raises(ValueError):
        parse_column_type(spec)
