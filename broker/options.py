"""Command-line options both commands share: the persistence settings and their value types."""

from __future__ import annotations

import functools
import re
from datetime import datetime

import click

from .config import PersistenceConfig
from .log import FSYNC_POLICIES

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


def _stack(decorators):
    """Apply several click option decorators as one, in the order listed."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def persistence_options(env_prefix: str):
    """The --persistence option set, reading TELEMETRY_*_<OPTION> from the environment."""
    option = functools.partial(click.option, show_envvar=True)
    decorators = [
        option("--persistence", is_flag=True, envvar=env_prefix + "PERSISTENCE", help="Keep each topic in a disk-persisted log."),
        option("--persistence-dir", default="/tmp/mq-data", envvar=env_prefix + "PERSISTENCE_DIR", help="Where the logs live (one directory per topic)."),
        option(
            "--segment-bytes", type=Size(minimum=4096), default="64MiB", envvar=env_prefix + "SEGMENT_BYTES", help="Roll to a new segment file at this size."
        ),
        option(
            "--fsync",
            type=click.Choice(FSYNC_POLICIES),
            default="interval",
            envvar=env_prefix + "FSYNC",
            help="always: before every acknowledgment; interval: every --fsync-interval-ms; never: leave it to the OS.",
        ),
        option("--fsync-interval-ms", type=click.IntRange(min=1), default=1000, envvar=env_prefix + "FSYNC_INTERVAL_MS"),
        option("--retention-bytes", type=Size(), default="1GiB", envvar=env_prefix + "RETENTION_BYTES", help="Delete the oldest segments beyond this size."),
        option(
            "--retention-age",
            type=Duration(),
            default="off",
            envvar=env_prefix + "RETENTION_AGE",
            help="Delete segments whose newest record is older (e.g. 24h).",
        ),
    ]

    return _stack(decorators)


def persistence_config(persistence, persistence_dir, segment_bytes, fsync, fsync_interval_ms, retention_bytes, retention_age) -> PersistenceConfig | None:
    if not persistence:
        return None
    return PersistenceConfig(
        directory=persistence_dir,
        segment_bytes=segment_bytes,
        fsync=fsync,
        fsync_interval_s=fsync_interval_ms / 1000,
        retention_bytes=retention_bytes,
        retention_age_s=retention_age,
    )


def consumer_options(env_prefix: str):
    """Options for the broker's consumers: subscriber queues, ack timeout, dead-lettering."""
    option = functools.partial(click.option, show_envvar=True)
    decorators = [
        option(
            "--subscriber-queue",
            type=click.IntRange(min=1),
            default=100,
            envvar=env_prefix + "SUBSCRIBER_QUEUE",
            help="Batches a subscriber may have queued; beyond, its new batches are dropped and counted.",
        ),
        option(
            "--ack-timeout",
            type=Duration(),
            default="30s",
            envvar=env_prefix + "ACK_TIMEOUT",
            help="A group's message not acknowledged this long is delivered again.",
        ),
        option(
            "--max-deliveries",
            type=click.IntRange(min=1),
            default=3,
            envvar=env_prefix + "MAX_DELIVERIES",
            help="Deliveries before a message goes to <topic>.dlq.",
        ),
    ]

    return _stack(decorators)
