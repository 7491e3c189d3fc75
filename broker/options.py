"""Command-line options both commands share: the persistence settings and their value types."""

from __future__ import annotations

import functools

import click

from common.options import Duration, Size, bool_flag, stack

from .config import PersistenceConfig
from .segmentlog import FSYNC_POLICIES


def persistence_options(env_prefix: str):
    """The --persistence option set, reading TELEMETRY_*_<OPTION> from the environment."""
    option = functools.partial(click.option, show_envvar=True)
    decorators = [
        bool_flag(
            "--persistence",
            envvar=env_prefix + "PERSISTENCE",
            show_envvar=True,
            help="Keep each topic in a disk-persisted log (--persistence, --persistence=true|false).",
        ),
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
        option(
            "--fsync-interval-ms",
            type=click.IntRange(min=1, max=3_600_000),
            default=1000,
            envvar=env_prefix + "FSYNC_INTERVAL_MS",
            help="With --fsync=interval: milliseconds between fsyncs of the log.",
        ),
        option("--retention-bytes", type=Size(), default="1GiB", envvar=env_prefix + "RETENTION_BYTES", help="Delete the oldest segments beyond this size."),
        option(
            "--retention-age",
            type=Duration(),
            default="off",
            envvar=env_prefix + "RETENTION_AGE",
            help="Delete segments whose newest record is older (e.g. 24h).",
        ),
    ]

    return stack(decorators)


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
            type=Duration(allow_off=False, minimum=0.001),
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

    return stack(decorators)
