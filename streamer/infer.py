"""How one CSV value becomes one JSON value.

Every value is typed on its own (no column-wide guessing):

    "4096"  "-3"  "+7"         -> int     (ASCII digits, optional sign, within 64 bits)
    "1.5"  ".5"  "2."  "1e-3"  -> float   (ASCII decimal or exponent form, finite)
    "true"  "FALSE"            -> bool    (any case)
    anything else              -> str     (the empty string included)

"1" and "0" are numbers, never booleans: a utilization of 0 must not become false.
Only plain ASCII number forms count: what Python's int()/float() accept beyond that
(underscores, non-ASCII digits, surrounding spaces, nan, inf) stays a string, so that every
message is strict JSON.

`--column-type NAME=TYPE` forces one column's type instead (see COLUMN_TYPES); a value that
cannot be converted makes the row unusable (the caller skips and counts it), and an empty
value in a forced bool/int/float column becomes null.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson encodes as a JSON integer
_INF = float("inf")

Converter = Callable[[str], object]


class BadValue(ValueError):
    """A value that a forced column type cannot hold."""


def infer(value: str) -> object:
    """Type one value by its own form (see the module docstring)."""
    if _INT.fullmatch(value):
        number = int(value)
        return number if _INT_MIN <= number <= _INT_MAX else value
    if _FLOAT.fullmatch(value):
        real = float(value)
        return real if -_INF < real < _INF else value
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return value


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _to_bool(value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    if not lowered:
        return None
    raise BadValue(f"{value!r} is not a bool")


def _to_int(value: str) -> int | None:
    if not value:
        return None
    if _INT.fullmatch(value):
        number = int(value)
        if _INT_MIN <= number <= _INT_MAX:
            return number
    raise BadValue(f"{value!r} is not a 64-bit int")


def _to_float(value: str) -> float | None:
    if not value:
        return None
    if _INT.fullmatch(value) or _FLOAT.fullmatch(value):
        real = float(value)
        if -_INF < real < _INF:
            return real
    raise BadValue(f"{value!r} is not a finite float")


COLUMN_TYPES: dict[str, Converter] = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "string": str,
}


def parse_column_type(spec: str) -> tuple[str, str]:
    """Parse one `NAME=TYPE` option value; raises ValueError with a user-facing reason."""
    name, sep, type_name = spec.rpartition("=")
    if not sep or not name:
        raise ValueError(f"{spec!r} is not NAME=TYPE")
    type_name = type_name.strip().lower()
    if type_name not in COLUMN_TYPES:
        raise ValueError(f"unknown column type {type_name!r} in {spec!r} (choose from {', '.join(COLUMN_TYPES)})")
    return name, type_name


def converters_for(header: list[str], column_types: dict[str, str]) -> list[Converter]:
    """One converter per column: the forced type where one is given, inference elsewhere."""
    return [COLUMN_TYPES[column_types[name]] if name in column_types else infer for name in header]
