"""The replay options of `telemetry-streamer` (streamer.replay), and the ReplayConfig they make.

Kept apart from streamer.cli so the command line's other options and these change independently;
`replay_options` decorates the command, `replay_config` checks the values against the inputs'
columns and builds the config (bad values exit 2 through click, before anything starts).
"""

from __future__ import annotations

import math

import click
import orjson

from .config import ReplayConfig
from .profile import parse_profile
from .timestamps import find_time_column, parse_time_ns

NAMES = (
    "passes",
    "once",
    "no_progress",
    "filters",
    "key_columns",
    "shard",
    "pace",
    "speed",
    "timestamp_column",
    "max_gap",
    "timestamps",
    "counter_columns",
    "total_rate",
    "profile",
    "profile_repeat",
)


def _positive(ctx, param, value):
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise click.BadParameter(f"{value!r} must be a finite number > 0")
    return value


def _filters(ctx, param, values: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    parsed = []
    for spec in values:
        column, sep, accepted = spec.partition("=")
        if not sep or not column:
            raise click.BadParameter(f"{spec!r} is not COLUMN=V1,V2")
        parsed.append((column, tuple(accepted.split(","))))
    return tuple(parsed)


def _columns(ctx, param, value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    columns = tuple(c for c in value.split(",") if c)
    if not columns:
        raise click.BadParameter(f"{value!r} names no column")
    return columns


def _profile(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return parse_profile(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def replay_options(option, env):
    """Decorate the command with the replay options (`option`: click.option with show_envvar)."""
    decorators = [
        option(
            "--passes",
            type=click.IntRange(min=1),
            default=None,
            envvar=env("PASSES"),
            help="Passes over the input, then drain, print a summary and exit (default: forever).",
        ),
        option("--once", is_flag=True, envvar=env("ONCE"), help="One pass (= --passes 1)."),
        option("--no-progress", is_flag=True, envvar=env("NO_PROGRESS"), help="No progress bar (there is none either when stderr is not a terminal)."),
        option(
            "--filter",
            "filters",
            multiple=True,
            callback=_filters,
            envvar=env("FILTER"),
            metavar="COLUMN=V1,V2",
            help="Send only rows whose COLUMN is one of the values (repeatable: rows must match every filter).",
        ),
        option("--key-columns", callback=_columns, envvar=env("KEY_COLUMNS"), metavar="A,B", help="Key each message by these columns' values (joined by /)."),
        option(
            "--shard",
            is_flag=True,
            envvar=env("SHARD"),
            help="Split rows across the workers (by key with --key-columns, else row by row) instead of every worker sending every row.",
        ),
        option(
            "--pace",
            type=click.Choice(["rate", "timestamps"]),
            default="rate",
            envvar=env("PACE"),
            help="rate: --rate per worker; timestamps: each row when its timestamp says (relative to the first row), divided by --speed.",
        ),
        option("--speed", type=float, default=1.0, callback=_positive, envvar=env("SPEED"), help="--pace=timestamps: how many times faster than recorded."),
        option(
            "--timestamp-column",
            default=None,
            envvar=env("TIMESTAMP_COLUMN"),
            help="The column with each row's time (default: a column named like timestamp/time/ts whose values parse).",
        ),
        option(
            "--max-gap",
            type=float,
            default=60.0,
            callback=_positive,
            envvar=env("MAX_GAP"),
            help="--pace=timestamps: a longer gap in the recording is shortened to this many seconds (then divided by --speed); logged once.",
        ),
        option(
            "--timestamps",
            type=click.Choice(["now", "original", "shifted"]),
            default="now",
            envvar=env("TIMESTAMPS"),
            help="Message timestamp: now (processing time), original (the row's, as RFC 3339 UTC), shifted (the row's, moved so the first row is now; later passes continue after it).",
        ),
        option(
            "--counter-column",
            "counter_columns",
            multiple=True,
            envvar=env("COUNTER_COLUMN"),
            metavar="NAME",
            help="A counter: raised each pass by its increase over one pass (per key), so it never resets (repeatable).",
        ),
        option(
            "--total-rate",
            type=float,
            default=None,
            callback=_positive,
            envvar=env("TOTAL_RATE"),
            help="Messages per second of all workers together (instead of --rate).",
        ),
        option(
            "--profile",
            default=None,
            callback=_profile,
            envvar=env("PROFILE"),
            help='Total rate over time: "ramp 100 10000 60s; hold 10000 5m; burst 20000 2s every 10s for 1m" (then drain and exit, unless --profile-repeat).',
        ),
        option("--profile-repeat", is_flag=True, envvar=env("PROFILE_REPEAT"), help="Loop the --profile forever."),
    ]

    def decorate(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return decorate


def replay_config(values: dict, *, workers: int, columns: list[str], first_row, read_once: bool) -> tuple[ReplayConfig, float | None]:
    """The ReplayConfig from the options' values (`values`: the NAMES); `first_row()` gives the
    first usable row's encoded fields (for finding the timestamp column). Returns it and the
    per-worker rate that --total-rate sets (None without it)."""
    passes = values["passes"]
    if values["once"]:
        if passes not in (None, 1):
            raise click.UsageError("--once is --passes 1: give one of them")
        passes = 1
    rate = values["total_rate"] / workers if values["total_rate"] is not None else None
    if read_once:  # standard input or a FIFO: one pass, nothing known in advance
        reading_again = (passes or 1) > 1 or values["filters"] or values["key_columns"] or values["shard"] or values["counter_columns"]
        if reading_again or values["pace"] != "rate" or values["timestamps"] != "now" or values["profile"] or values["timestamp_column"]:
            raise click.UsageError(
                "the replay options (--passes, --filter, --key-columns, --shard, --pace, --timestamps, --profile, ...) need inputs that can be read again,"
                " not standard input or a FIFO (--once is fine: such an input is read once anyway)"
            )
        return ReplayConfig(workers=workers), rate
    known = set(columns)

    def check(names, option):
        for name in names:
            if name not in known:
                raise click.BadParameter(f"no column named {name!r} (columns: {', '.join(columns)})", param_hint=f"'{option}'")

    check([c for c, _ in values["filters"]], "--filter")
    check(values["key_columns"], "--key-columns")
    check(values["counter_columns"], "--counter-column")
    profile = values["profile"]
    if profile is not None and values["profile_repeat"]:
        profile = type(profile)(profile.steps, True)
    if profile is not None and values["total_rate"] is not None:
        raise click.UsageError("--profile sets the total rate over time: give --total-rate or --profile, not both")
    if profile is not None and values["pace"] == "timestamps":
        raise click.UsageError("--pace=timestamps sends rows when their timestamps say: it cannot follow a --profile too")
    if values["profile_repeat"] and profile is None:
        raise click.UsageError("--profile-repeat repeats a --profile: give one")
    column = values["timestamp_column"]
    needs_time = values["pace"] == "timestamps" or values["timestamps"] != "now"
    if column:
        check([column], "--timestamp-column")
    elif needs_time:
        fields = orjson.loads(first_row())
        column = find_time_column(fields)
        if column is None:
            raise click.UsageError("no column named like timestamp/time/ts with a time in the first row: name it with --timestamp-column")
    if column and needs_time:
        value = orjson.loads(first_row()).get(column)
        if parse_time_ns(value) is None:
            raise click.BadParameter(f"{value!r} in the first row of column {column!r} is not a time", param_hint="'--timestamp-column'")
    cfg = ReplayConfig(
        passes=passes or 0,
        filters=values["filters"],
        key_columns=values["key_columns"],
        shard=values["shard"],
        pace=values["pace"],
        speed=values["speed"],
        timestamp_column=column if needs_time else "",
        max_gap=values["max_gap"],
        timestamps=values["timestamps"],
        counter_columns=tuple(values["counter_columns"]),
        profile=profile,
        workers=workers,
    )
    return cfg, rate
