"""A row's own time: which column holds it, and its value as nanoseconds since the epoch (UTC).

Accepted forms (one value at a time, no column-wide guessing):

    2025-10-17T13:27:41.129926216Z     RFC 3339 / ISO 8601: `T` or a space, fraction up to 9 digits,
    2025-10-17 13:27:41+02:00          zone `Z` or +HH:MM / +HHMM / +HH; no zone = UTC
    2025/10/17 13:27:41.129            nvidia-smi's form (slashes; no zone = UTC)
    1760707661  1760707661129          epoch seconds, milliseconds, microseconds or nanoseconds,
    1760707661129926  1.7607e9         told apart by magnitude (below 1e11: s, 1e14: ms, 1e17: us, else ns)

A value in none of these forms is not a time (None): the row is skipped as `bad_timestamp`.
"""

from __future__ import annotations

import re
from datetime import date

NS = 1_000_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DATETIME = re.compile(
    r"(\d{4})[-/](\d{2})[-/](\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?\s*(?:(Z)|([+-])(\d{2})(?::?(\d{2}))?)?",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"(?i)(@?timestamp|time|ts|datetime|date_?time|.*[_ .-](timestamp|time|ts)|time_?stamp.*|.*timestamp)")


def epoch_ns(value: float | int) -> int:
    """An epoch number in seconds, ms, us or ns (by magnitude) as nanoseconds."""
    magnitude = abs(value)
    if magnitude < 1e11:
        scale = NS
    elif magnitude < 1e14:
        scale = 1_000_000
    elif magnitude < 1e17:
        scale = 1_000
    else:
        scale = 1
    if isinstance(value, int):
        return value * scale
    return round(value * scale)


def parse_time_ns(value: object) -> int | None:
    """A value from a row (typed by streamer.infer) as nanoseconds since the epoch, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return epoch_ns(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    m = _DATETIME.fullmatch(text)
    if m is None:
        if _NUMBER.fullmatch(text):
            number = float(text) if any(c in text for c in ".eE") else int(text)
            return epoch_ns(number)
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, zh, zm = m.groups()
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    h, mi, s = int(hour or 0), int(minute or 0), int(second or 0)
    if h > 23 or mi > 59 or s > 60:
        return None
    seconds = days * 86400 + h * 3600 + mi * 60 + s
    if sign:
        offset = int(zh) * 3600 + int(zm or 0) * 60
        seconds -= offset if sign == "+" else -offset
    return seconds * NS + (int(fraction.ljust(9, "0")) if fraction else 0)


def looks_like_time_column(name: str) -> bool:
    """A column named like timestamp / time / ts (`timestamp`, `event_time`, `@timestamp`, `ts`)."""
    return _NAME.fullmatch(name.strip()) is not None


def find_time_column(fields: dict) -> str | None:
    """The first column named like a time whose value (from one row) parses; None if there is none."""
    for name, value in fields.items():
        if looks_like_time_column(name) and parse_time_ns(value) is not None:
            return name
    return None
