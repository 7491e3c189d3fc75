"""How one CSV value becomes one JSON value.

Every value is typed on its own (no column-wide guessing):

    "4096"  "-3"  "+7"  "0"    -> int     (ASCII digits, optional sign, within 64 bits)
    "1.5"  ".5"  "2."  "1e-3"  -> float   (ASCII decimal or exponent form, finite)
    "true"  "FALSE"            -> bool    (any case)
    "[N/A]"  "[Not Supported]" -> null    (nvidia-smi's words for no value; --null-value adds more)
    anything else              -> str     (the empty string included)

"1" and "0" are numbers, never booleans: a utilization of 0 must not become false.
Only plain ASCII number forms count: what Python's int()/float() accept beyond that
(underscores, non-ASCII digits, surrounding spaces, nan, inf) stays a string, so that every
message is strict JSON. A value stays a string, too, where the number would not print back as
the value it was: leading zeros ("007", the zip code "08123"), integers outside 64 bits, and
floats that overflow to infinity or underflow to zero ("1e-400").

Units: a column whose header ends in a unit in brackets, as nvidia-smi writes them
(`memory.used [MiB]`, `utilization.gpu [%]`), has that unit dropped from the end of its values
("1024 MiB" -> 1024).

`--column-type NAME=TYPE` forces one column's type instead (see COLUMN_TYPES); a value that
cannot be converted makes the row unusable (the caller skips and counts it), and an empty
value in a forced bool/int/float column becomes null.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

_INT = re.compile(r"[+-]?(?:0|[1-9][0-9]*)")  # no leading zeros: "007" stays "007"
_FLOAT = re.compile(r"[+-]?(?:(?:0|[1-9][0-9]*)\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:0|[1-9][0-9]*)[eE][+-]?[0-9]+")
_ANY_INT = re.compile(r"[+-]?[0-9]+")  # a forced int column takes "007" as 7
_ANY_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?[0-9]+[eE][+-]?[0-9]+")
_NONZERO_MANTISSA = re.compile(r"[+-]?0*\.?0*[1-9]")
_UNIT = re.compile(r".*\S\s+\[([^\[\]]+)\]\s*")
NULLS = frozenset({"[N/A]", "[Not Supported]"})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson encodes as a JSON integer
_INF = float("inf")

Converter = Callable[[str], object]


class BadValue(ValueError):
    """A value that a forced column type cannot hold."""


def infer(value: str, nulls: frozenset = NULLS) -> object:
    """Type one value by its own form (see the module docstring)."""
    if _INT.fullmatch(value):
        number = int(value)
        return number if _INT_MIN <= number <= _INT_MAX else value
    if _FLOAT.fullmatch(value):
        real = float(value)
        if -_INF < real < _INF and (real or not _NONZERO_MANTISSA.match(value)):
            return real
        return value
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if value in nulls:
        return None
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
    value = value.strip()
    if not value:
        return None
    if _ANY_INT.fullmatch(value):
        number = int(value)
        if _INT_MIN <= number <= _INT_MAX:
            return number
    raise BadValue(f"{value!r} is not a 64-bit int")


def _to_float(value: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    if _ANY_INT.fullmatch(value) or _ANY_FLOAT.fullmatch(value):
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


def _string(value: str) -> str:
    return value


COLUMN_TYPES["string"] = _string


def parse_column_type(spec: str) -> tuple[str, str]:
    """Parse one `NAME=TYPE` option value; raises ValueError with a user-facing reason."""
    name, sep, type_name = spec.rpartition("=")
    if not sep or not name:
        raise ValueError(f"{spec!r} is not NAME=TYPE")
    type_name = type_name.strip().lower()
    if type_name not in COLUMN_TYPES:
        raise ValueError(f"unknown column type {type_name!r} in {spec!r} (choose from {', '.join(COLUMN_TYPES)})")
    return name, type_name


def unit_of(name: str) -> str | None:
    """The unit a column name declares in brackets at its end (`power.draw [W]` -> "W"), or None."""
    match = _UNIT.fullmatch(name)
    return match.group(1).strip() if match else None


def converters_for(header: list[str], column_types: dict[str, str], null_values: tuple[str, ...] = ()) -> list[Converter]:
    """One converter per column: the forced type where one is given, inference elsewhere; units
    declared in a column's name are dropped from its values, and null words become null."""
    nulls = NULLS | frozenset(null_values)
    if nulls == NULLS:
        inferred: Converter = infer
    elif any(_INT.fullmatch(v) or _FLOAT.fullmatch(v) or v.lower() in ("true", "false") for v in nulls):
        inferred = functools.partial(_nulls_first, nulls=nulls)
    else:
        inferred = functools.partial(infer, nulls=nulls)
    converters = []
    for name in header:
        if name in column_types:
            converter = functools.partial(_nulls_first, nulls=nulls, convert=COLUMN_TYPES[column_types[name]])
        else:
            converter = inferred
        unit = unit_of(name)
        if unit is not None:
            converter = functools.partial(_without_unit, suffix=" " + unit, convert=converter)
        converters.append(converter)
    return converters


def _nulls_first(value: str, nulls: frozenset, convert: Converter = infer) -> object:
    if value in nulls or value.strip() in nulls:
        return None
    return convert(value) if convert is not infer else infer(value, nulls)


def _without_unit(value: str, suffix: str, convert: Converter) -> object:
    return convert(value[: -len(suffix)] if value.endswith(suffix) else value)
