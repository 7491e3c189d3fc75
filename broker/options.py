"""Command-line options both commands share: the persistence settings and their value types."""

from __future__ import annotations

import functools
import os

import click

from common.options import Duration, Size, stack

from .config import Limits, PersistenceConfig
from .segmentlog import FSYNC_POLICIES


def default_state_dir() -> str:
    """Where the logs live unless told: the user's state directory (XDG Base Directory
    specification), never a world-writable place such as /tmp. The image sets /var/lib/telemetry."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "telemetry-streamer")


def persistence_dir_option(env_prefix: str, help_text: str):
    return click.option(
        "--persistence-dir",
        default=default_state_dir,
        show_default="$XDG_STATE_HOME/telemetry-streamer, else ~/.local/state/telemetry-streamer",
        show_envvar=True,
        envvar=env_prefix + "PERSISTENCE_DIR",
        help=help_text,
    )


def persistence_options(env_prefix: str):
    """The --persistence option set, reading TELEMETRY_*_<OPTION> from the environment."""
    option = functools.partial(click.option, show_envvar=True)
    decorators = [
        option("--persistence", is_flag=True, envvar=env_prefix + "PERSISTENCE", help="Keep each topic in a disk-persisted log."),
        persistence_dir_option(env_prefix, "Where the logs live (one directory per topic; created 0700, files 0600)."),
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

    return stack(decorators)


LIMIT_OPTIONS = (
    "max_topics",
    "max_groups",
    "max_producers",
    "producer_expiry",
    "max_subscribers",
    "subscriber_idle",
    "max_replay_bytes",
    "max_sse",
    "max_report_bytes",
)


def limit_options(env_prefix: str):
    """What any peer may make the broker hold (broker.config.Limits)."""
    option = functools.partial(click.option, show_envvar=True)
    d = Limits()
    decorators = [
        option(
            "--max-topics",
            type=click.IntRange(min=1),
            default=d.max_topics,
            envvar=env_prefix + "MAX_TOPICS",
            help="Topics the broker holds; a PUBLISH to a new topic beyond is refused (NACK U).",
        ),
        option("--max-groups", type=click.IntRange(min=1), default=d.max_groups, envvar=env_prefix + "MAX_GROUPS", help="Consumer groups per topic."),
        option(
            "--max-producers",
            type=click.IntRange(min=1),
            default=d.max_producers,
            envvar=env_prefix + "MAX_PRODUCERS",
            help="Producers a topic tracks; a new producer beyond is refused (NACK U) until one expires.",
        ),
        option(
            "--producer-expiry",
            type=Duration(),
            default="1h",
            envvar=env_prefix + "PRODUCER_EXPIRY",
            help="Forget a producer (and its de-duplication state) idle this long; off = never.",
        ),
        option(
            "--max-subscribers",
            type=click.IntRange(min=1),
            default=d.max_subscribers,
            envvar=env_prefix + "MAX_SUBSCRIBERS",
            help="ZeroMQ subscribers per topic, and members per consumer group.",
        ),
        option(
            "--subscriber-idle",
            type=Duration(),
            default="60s",
            envvar=env_prefix + "SUBSCRIBER_IDLE",
            help="Drop a ZeroMQ subscription without credit that has sent nothing this long.",
        ),
        option(
            "--max-replay-bytes",
            type=Size(minimum=1 << 20),
            default="256MiB",
            envvar=env_prefix + "MAX_REPLAY_BYTES",
            help="Replayed bytes not yet consumed, all subscribers together; replays wait beyond.",
        ),
        option("--max-sse", type=click.IntRange(min=1), default=d.max_sse, envvar=env_prefix + "MAX_SSE", help="Server-Sent Events streams, broker-wide."),
        option(
            "--max-report-bytes",
            type=Size(minimum=256),
            default="16KiB",
            envvar=env_prefix + "MAX_REPORT_BYTES",
            help="Largest producer REPORT accepted.",
        ),
    ]
    return stack(decorators)


def limits_config(options: dict) -> Limits:
    """Limits from the click options (popped from `options`)."""
    values = {name: options.pop(name) for name in LIMIT_OPTIONS}
    expiry = values.pop("producer_expiry")
    idle = values.pop("subscriber_idle") or Limits.subscriber_idle_s
    return Limits(**values, producer_expiry_s=expiry, subscriber_idle_s=idle)
