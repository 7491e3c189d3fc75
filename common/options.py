"""Option value types both commands share (sizes, durations, times, booleans) and a helper to
apply a set of click options as one decorator."""

from __future__ import annotations

import re
from datetime import datetime

import click

_SIZE = re.compile(r"(\d+)\s*([KMGT]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_SECONDS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}


class Size(click.ParamType):
    """Bytes: 1048576, 64MiB, 64M, 1GiB (binary units)."""

    name = "size"

    def __init__(self, minimum: int = 0):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            size = value
        else:
            match = _SIZE.fullmatch(str(value).strip())
            if not match:
                self.fail(f"{value!r} is not a size (e.g. 1048576, 64MiB, 1GiB)", param, ctx)
            size = int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].lower()]
        if size < self.minimum:
            self.fail(f"{value!r} is less than {self.minimum} bytes", param, ctx)
        return size


class Duration(click.ParamType):
    """Seconds: 90, 90s, 15m, 24h, 7d; `off` for none."""

    name = "duration"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text in ("off", "none", "0"):
            return None
        match = _DURATION.fullmatch(text)
        if not match:
            self.fail(f"{value!r} is not a duration (e.g. 90s, 15m, 24h, 7d, off)", param, ctx)
        return float(match.group(1)) * _SECONDS[match.group(2) or ""]


class Timestamp(click.ParamType):
    """An RFC 3339 time (2025-10-17T13:00:00Z, with optional fraction and offset), as ns since the epoch."""

    name = "time"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r} is not an RFC 3339 time (e.g. 2025-10-17T13:00:00Z)", param, ctx)
        if parsed.tzinfo is None:
            self.fail(f"{value!r} has no time zone (add Z for UTC)", param, ctx)
        return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000


def stack(decorators):
    """Apply several click option decorators as one, in the order listed."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply
