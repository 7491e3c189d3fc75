"""Command-line options both commands share: the persistence settings, consumer settings,
CURVE keys and HTTP protection, and what they turn into."""

from __future__ import annotations

import functools
import os

import click

from common.options import Duration, Size, bool_flag, stack

from .config import CurveConfig, HttpSecurity, Limits, PersistenceConfig
from .curve import ClientKeys, KeyFileError, load_authorized_keys, load_key_pair
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
        bool_flag(
            "--persistence",
            envvar=env_prefix + "PERSISTENCE",
            show_envvar=True,
            help="Keep each topic in a disk-persisted log (--persistence, --persistence=true|false).",
        ),
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


def curve_server_options(env_prefix: str):
    """The broker side of CURVE: its key pair and the directory of client keys allowed in."""
    option = functools.partial(click.option, show_envvar=True)
    return stack(
        [
            option(
                "--curve-secret-key",
                metavar="FILE",
                envvar=env_prefix + "CURVE_SECRET_KEY",
                help="CURVE on the ZeroMQ port: the broker's key pair (a .key_secret file from `telemetry-broker keygen`).",
            ),
            option(
                "--curve-authorized-keys",
                metavar="DIR",
                envvar=env_prefix + "CURVE_AUTHORIZED_KEYS",
                help="With --curve-secret-key: only clients whose public key is a DIR/*.key file may connect (reread on SIGHUP).",
            ),
        ]
    )


def curve_config(curve_secret_key: str | None, curve_authorized_keys: str | None) -> CurveConfig | None:
    """The broker's CURVE settings, checked now: a bad key file ends the start in one line."""
    if curve_secret_key is None and curve_authorized_keys is None:
        return None
    if curve_secret_key is None or curve_authorized_keys is None:
        raise click.UsageError("--curve-secret-key and --curve-authorized-keys go together")
    try:
        load_key_pair(curve_secret_key)
        load_authorized_keys(curve_authorized_keys)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    return CurveConfig(secret_key_file=curve_secret_key, authorized_keys_dir=curve_authorized_keys)


def curve_client_options(env_prefix: str):
    """The client side of CURVE: the broker's public key and this client's key pair."""
    option = functools.partial(click.option, show_envvar=True)
    return stack(
        [
            option(
                "--curve-server-key",
                metavar="FILE",
                envvar=env_prefix + "CURVE_SERVER_KEY",
                help="Connect with CURVE: the broker's public key (its .key file).",
            ),
            option(
                "--curve-client-key",
                metavar="FILE",
                envvar=env_prefix + "CURVE_CLIENT_KEY",
                help="With --curve-server-key: this client's key pair (a .key_secret file whose .key the broker allows).",
            ),
        ]
    )


def client_keys(curve_server_key: str | None, curve_client_key: str | None) -> ClientKeys | None:
    if curve_server_key is None and curve_client_key is None:
        return None
    if curve_server_key is None or curve_client_key is None:
        raise click.UsageError("--curve-server-key and --curve-client-key go together")
    try:
        return ClientKeys.load(curve_server_key, curve_client_key)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def http_security_options(env_prefix: str):
    """A bearer token for the HTTP endpoints, and HTTPS."""
    option = functools.partial(click.option, show_envvar=True)
    return stack(
        [
            option(
                "--http-token-file",
                metavar="FILE",
                envvar=env_prefix + "HTTP_TOKEN_FILE",
                help="Every HTTP path but /healthz, /readyz and the console's page wants `Authorization: Bearer <the token in FILE>`.",
            ),
            option("--http-tls-cert", metavar="FILE", envvar=env_prefix + "HTTP_TLS_CERT", help="Serve HTTPS with this PEM certificate (chain)."),
            option("--http-tls-key", metavar="FILE", envvar=env_prefix + "HTTP_TLS_KEY", help="The private key of --http-tls-cert (PEM)."),
        ]
    )


def http_security(http_token_file: str | None, http_tls_cert: str | None, http_tls_key: str | None) -> HttpSecurity:
    """The HTTP protection, checked now (the token read, the certificate loaded once)."""
    from common.httpauth import HttpSecurityError, read_token_file, tls_context  # aiohttp: only once a server starts

    if (http_tls_cert is None) != (http_tls_key is None):
        raise click.UsageError("--http-tls-cert and --http-tls-key go together")
    try:
        token = read_token_file(http_token_file) if http_token_file is not None else None
        if http_tls_cert is not None:
            tls_context(http_tls_cert, http_tls_key)
    except HttpSecurityError as exc:
        raise click.ClickException(str(exc)) from None
    return HttpSecurity(token=token, tls_cert=http_tls_cert, tls_key=http_tls_key)


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
    "max_memory_bytes",
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
        option(
            "--max-memory-bytes",
            type=Size(minimum=1 << 20),
            default="256MiB",
            envvar=env_prefix + "MAX_MEMORY_BYTES",
            help="Without --persistence: recent batches kept for replay, all topics together (each topic keeps at most 64 MiB); the oldest go first.",
        ),
    ]
    return stack(decorators)


def limits_config(options: dict) -> Limits:
    """Limits from the click options (popped from `options`)."""
    values = {name: options.pop(name) for name in LIMIT_OPTIONS}
    expiry = values.pop("producer_expiry")
    idle = values.pop("subscriber_idle") or Limits.subscriber_idle_s
    return Limits(**values, producer_expiry_s=expiry, subscriber_idle_s=idle)
