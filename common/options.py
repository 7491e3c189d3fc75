"""Option value types both commands share (sizes, durations, times, booleans) and helpers to
declare a boolean flag (`bool_flag`) and to apply a set of click options as one decorator."""

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
    """Seconds: 90, 90s, 15m, 24h, 7d; `off` (or 0) for none where allow_off, else a usage error.

    A value below `minimum` (such as --ack-timeout=0) is refused rather than replaced."""

    name = "duration"

    def __init__(self, allow_off: bool = True, minimum: float = 0.0):
        self.allow_off = allow_off
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text in ("off", "none"):
            if self.allow_off:
                return None
            self.fail(f"{value!r}: this duration cannot be turned off", param, ctx)
        match = _DURATION.fullmatch(text)
        if not match:
            self.fail(f"{value!r} is not a duration (e.g. 90s, 15m, 24h, 7d{', off' if self.allow_off else ''})", param, ctx)
        seconds = float(match.group(1)) * _SECONDS[match.group(2) or ""]
        if seconds == 0 and self.allow_off:
            return None
        if seconds < self.minimum:
            self.fail(f"{value!r} is too short (at least {self.minimum:g} s)", param, ctx)
        return seconds


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


class Bool(click.ParamType):
    """A yes/no value: true/false, 1/0, yes/no, on/off (any case)."""

    name = "bool"
    TRUE = frozenset({"true", "1", "yes", "on"})
    FALSE = frozenset({"false", "0", "no", "off"})

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in self.TRUE:
            return True
        if text in self.FALSE:
            return False
        self.fail(f"{value!r} is not a boolean (use true/false, 1/0, yes/no or on/off)", param, ctx)


BOOL = Bool()


def bool_flag(*names: str, **kwargs):
    """A boolean flag that also takes a value: `--flag`, `--flag=true|false|1|0|yes|no|on|off`,
    and the same words in its environment variable. (Manifests written for the original tool
    say `--persistence=true`.) Give the value with `=`: a bare `--flag` is true."""
    kwargs.setdefault("default", False)
    return click.option(*names, type=BOOL, is_flag=False, flag_value="true", metavar="[=BOOL]", **kwargs)


def stack(decorators):
    """Apply several click option decorators as one, in the order listed."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply
