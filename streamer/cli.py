"""`telemetry-streamer`: the command line, turned into one StreamerConfig.

Every option can also be set from the environment as TELEMETRY_STREAMER_<OPTION> (dashes
become underscores: TELEMETRY_STREAMER_WORKERS=5, TELEMETRY_STREAMER_BROKER_URL=...).
"""

from __future__ import annotations

import functools
import logging
import math
import re

import click

from broker.config import BrokerConfig
from broker.options import consumer_options, limit_options, limits_config, persistence_config, persistence_options
from broker.protocol import MAX_MESSAGE_BYTES
from common import commandline
from common.logsetup import FORMATS, LEVELS, setup_logging
from common.names import NAME_RULE, valid_topic
from common.options import Size

from .config import StreamerConfig, WorkerConfig
from .csvsource import CsvError, check_csv
from .infer import parse_column_type

ENV_PREFIX = "TELEMETRY_STREAMER_"
PORT = click.IntRange(0, 65535)
option = functools.partial(click.option, show_envvar=True)
_BROKER_URL = re.compile(r"(tcp://[^\s:/]+|tcp://\[[0-9a-fA-F:]+\]):[0-9]{1,5}|ipc://\S+")


def env(name: str) -> str:
    return ENV_PREFIX + name


class Rate(click.ParamType):
    """Messages per second: a finite number >= 0, fractions allowed; 0 means unthrottled."""

    name = "rate"

    def convert(self, value, param, ctx):
        try:
            rate = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of messages per second", param, ctx)
        if not math.isfinite(rate) or rate < 0:
            self.fail(f"{value!r} must be a finite number >= 0 (0 means unthrottled)", param, ctx)
        return rate


def _topic(ctx, param, value: str) -> str:
    if not valid_topic(value):
        raise click.BadParameter(f"{value!r}: {NAME_RULE}")
    return value


def _broker_url(ctx, param, value: str | None) -> str | None:
    if value is not None and not _BROKER_URL.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not tcp://HOST:PORT")
    return value


def _column_types(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    types: dict[str, str] = {}
    for spec in values:
        try:
            name, type_name = parse_column_type(spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        types[name] = type_name
    return types


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@option("--csv", "csv_path", required=True, envvar=env("CSV"), help="CSV file to stream (read again from the start at its end).")
@option("--workers", type=click.IntRange(min=1), default=1, envvar=env("WORKERS"), help="Worker processes.")
@option("--rate", type=Rate(), default=1.0, envvar=env("RATE"), help="Messages per second per worker (fractions allowed; 0 = unthrottled).")
@option("--topic", default="telemetry", callback=_topic, envvar=env("TOPIC"), help="Topic to publish to.")
@option(
    "--broker-url",
    default=None,
    callback=_broker_url,
    envvar=env("BROKER_URL"),
    help="Publish to a separate broker (tcp://HOST:PORT) instead of the embedded one.",
)
@option("--broker-port", type=PORT, default=5555, envvar=env("BROKER_PORT"), help="Embedded broker's ZeroMQ port on 127.0.0.1 (0 = any free port).")
@option(
    "--http-host",
    default="127.0.0.1",
    envvar=env("HTTP_HOST"),
    help="HTTP address: the embedded broker's, or with --broker-url the streamer's own (/healthz, /readyz, /metrics).",
)
@option("--http-port", type=PORT, default=8080, envvar=env("HTTP_PORT"), help="HTTP port (0 = any free port).")
@option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0, max=3600),
    default=10.0,
    envvar=env("SHUTDOWN_TIMEOUT"),
    help="Seconds a drain waits for acknowledgments.",
)
@option(
    "--column-type",
    "column_types",
    multiple=True,
    callback=_column_types,
    envvar=env("COLUMN_TYPE"),
    metavar="NAME=TYPE",
    help="Force a column's type: bool, int, float or string (repeatable).",
)
@option(
    "--max-message-bytes",
    type=Size(minimum=128),
    default=MAX_MESSAGE_BYTES,
    envvar=env("MAX_MESSAGE_BYTES"),
    help="Largest message: a row whose message is larger is skipped and counted (the embedded broker enforces it too).",
)
@option(
    "--buffer-messages",
    type=click.IntRange(min=1),
    default=100_000,
    envvar=env("BUFFER_MESSAGES"),
    help="Unacknowledged messages a worker holds before it pauses reading.",
)
@option(
    "--linger",
    type=click.FloatRange(min=0, max=10),
    default=0.5,
    envvar=env("LINGER"),
    help="Below 100 messages/s per worker: seconds a due message may wait to be sent with the others due (each keeps its due time as timestamp); 0 = send each at once.",
)
@consumer_options(ENV_PREFIX)
@limit_options(ENV_PREFIX)
@persistence_options(ENV_PREFIX)
@option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info", envvar=env("LOG_LEVEL"))
@option("--log-format", type=click.Choice(FORMATS), default="text", envvar=env("LOG_FORMAT"), help="text for people, json for log pipelines.")
def command(
    csv_path,
    workers,
    rate,
    topic,
    broker_url,
    broker_port,
    http_host,
    http_port,
    shutdown_timeout,
    column_types,
    buffer_messages,
    linger,
    max_message_bytes,
    log_level,
    log_format,
    subscriber_queue,
    ack_timeout,
    max_deliveries,
    **persistence,
):
    """Stream a CSV file's rows as timestamped JSON messages into a topic, from N worker processes."""
    if persistence["persistence"] and broker_url:
        raise click.UsageError("--persistence belongs to the broker: with --broker-url, give it to `telemetry-broker serve` instead")
    limits = limits_config(persistence)
    persistence_cfg = persistence_config(**persistence)
    try:
        header = check_csv(csv_path)
    except CsvError as exc:
        raise click.ClickException(f"cannot stream {exc}") from None
    unknown = [name for name in column_types if name not in header]
    if unknown:
        raise click.BadParameter(f"no column named {unknown[0]!r} in {csv_path} (columns: {', '.join(header)})", param_hint="'--column-type'")
    cfg = StreamerConfig(
        workers=workers,
        worker=WorkerConfig(
            csv=csv_path,
            rate=rate,
            topic=topic,
            broker_url=broker_url or "",
            column_types=column_types,
            shutdown_timeout=shutdown_timeout,
            buffer_messages=buffer_messages,
            linger=linger,
            max_message_bytes=max_message_bytes,
            log_level=log_level.lower(),
            log_format=log_format,
        ),
        http_host=http_host,
        http_port=http_port,
        broker=None
        if broker_url
        else BrokerConfig(
            host="127.0.0.1",
            port=broker_port,
            http_host=http_host,
            http_port=http_port,
            topics=(topic,),
            persistence=persistence_cfg,
            max_message_bytes=max_message_bytes,
            subscriber_queue=subscriber_queue,
            ack_timeout_s=ack_timeout or 30.0,
            max_deliveries=max_deliveries,
            limits=limits,
        ),
    )
    setup_logging(log_level, log_format, component="streamer")
    logging.getLogger("streamer").info("CSV %s: columns %s", csv_path, ", ".join(header))
    return _serve(cfg)


def _serve(cfg: StreamerConfig) -> int:
    import uvloop

    from broker.server import BrokerStartError

    from .supervisor import Supervisor

    try:
        return uvloop.run(Supervisor(cfg).run())
    except BrokerStartError as exc:
        raise click.ClickException(str(exc)) from None


def main() -> None:
    commandline.run(command, "telemetry-streamer")
