"""`telemetry-streamer`: the command line, turned into one StreamerConfig.

Every option can also be set from the environment as TELEMETRY_STREAMER_<OPTION> (dashes
become underscores: TELEMETRY_STREAMER_WORKERS=5, TELEMETRY_STREAMER_BROKER_URL=...).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import sys

import click

from broker.config import BrokerConfig
from broker.options import (
    client_keys,
    consumer_options,
    curve_client_options,
    curve_config,
    curve_server_options,
    http_security,
    http_security_options,
    limit_options,
    limits_config,
    persistence_config,
    persistence_options,
)
from broker.protocol import MAX_MESSAGE_BYTES
from common import commandline
from common.logsetup import FORMATS, LEVELS, setup_logging
from common.names import NAME_RULE, valid_topic
from common.natsconn import connection_from_options, connection_options, is_nats_url, valid_nats_url
from common.options import Duration, Size, bool_flag, stack

from .config import NatsConfig, StreamerConfig, WorkerConfig
from .csvreader import parse_delimiter
from .csvsource import CsvError, CsvFormat, check_csv
from .infer import parse_column_type
from .inputs import STDIN, InputError, check_encoding, expand, rereadable
from .replay_options import NAMES as REPLAY_OPTIONS
from .replay_options import replay_config, replay_options

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


class CsvPath(click.ParamType):
    """A --csv value; in TELEMETRY_STREAMER_CSV several are separated by ':' as in PATH (not by
    spaces: file names may have them)."""

    name = "path"
    envvar_list_splitter = os.pathsep

    def convert(self, value, param, ctx):
        return value


def _topic(ctx, param, value: str) -> str:
    if not valid_topic(value):
        raise click.BadParameter(f"{value!r}: {NAME_RULE}")
    return value


_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")


def _broker_url(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    if is_nats_url(value):
        if not valid_nats_url(value):
            raise click.BadParameter(f"{value!r} is not nats://[USER:PASS@]HOST[:PORT] (or tls://), comma-separated for several seeds")
    elif not _BROKER_URL.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not tcp://HOST:PORT, nats://HOST:PORT or tls://HOST:PORT")
    return value


def _delimiter(ctx, param, value: str) -> str | None:
    try:
        return parse_delimiter(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _encoding(ctx, param, value: str) -> str:
    try:
        return check_encoding(value)
    except LookupError:
        raise click.BadParameter(f"unknown encoding {value!r} (e.g. utf-8, utf-16-le, latin-1, cp1252)") from None


def _comment(ctx, param, value: str | None) -> str | None:
    if value is not None and len(value) != 1:
        raise click.BadParameter(f"{value!r} is not one character")
    return value


def _stream_name(ctx, param, value: str) -> str:
    if not _STREAM_NAME.fullmatch(value):
        raise click.BadParameter(f"{value!r}: a JetStream stream name is 1-255 of A-Z a-z 0-9 _ -")
    return value


def _positive_duration(ctx, param, value):
    if value is None:
        raise click.BadParameter("must be a duration greater than 0")
    return value


def nats_options():
    """Options that apply with a nats:// or tls:// --broker-url."""
    return stack(
        [
            connection_options(ENV_PREFIX),
            option("--nats-stream", default="TELEMETRY", callback=_stream_name, envvar=env("NATS_STREAM"), help="NATS: the JetStream stream to publish into."),
            bool_flag(
                "--nats-create-stream",
                envvar=env("NATS_CREATE_STREAM"),
                show_envvar=True,
                help="NATS: create the stream if it is missing (or add the topic to its subjects); else a missing stream is an error.",
            ),
            option("--nats-replicas", type=click.IntRange(1, 5), default=1, envvar=env("NATS_REPLICAS"), help="NATS: replicas of a stream it creates."),
            option(
                "--nats-storage",
                type=click.Choice(["file", "memory"]),
                default="file",
                envvar=env("NATS_STORAGE"),
                help="NATS: storage of a stream it creates.",
            ),
            option(
                "--nats-max-bytes", type=Size(), default=None, envvar=env("NATS_MAX_BYTES"), help="NATS: size limit of a stream it creates [default: none]."
            ),
            option("--nats-max-age", type=Duration(), default=None, envvar=env("NATS_MAX_AGE"), help="NATS: age limit of a stream it creates [default: none]."),
            option(
                "--nats-duplicate-window",
                type=Duration(),
                default="2m",
                callback=_positive_duration,
                envvar=env("NATS_DUPLICATE_WINDOW"),
                help="NATS: how long the stream it creates remembers message ids (resends within it are de-duplicated).",
            ),
            option(
                "--nats-connect-wait",
                type=Duration(),
                default="15s",
                callback=_positive_duration,
                envvar=env("NATS_CONNECT_WAIT"),
                help="NATS: how long start-up waits for a server and JetStream to answer before giving up.",
            ),
        ]
    )


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
@option(
    "--csv",
    "csv_specs",
    type=CsvPath(),
    required=True,
    multiple=True,
    envvar=env("CSV"),
    help="CSV file, glob or directory (its *.csv) to stream, read again from the start at its end; repeatable (in the environment: separated by ':'); - reads standard input once.",
)
@option("--workers", type=click.IntRange(min=1), default=1, envvar=env("WORKERS"), help="Worker processes.")
@option("--rate", type=Rate(), default=1.0, envvar=env("RATE"), help="Messages per second per worker (fractions allowed; 0 = unthrottled).")
@option("--topic", default="telemetry", callback=_topic, envvar=env("TOPIC"), help="Topic to publish to.")
@option(
    "--broker-url",
    default=None,
    callback=_broker_url,
    envvar=env("BROKER_URL"),
    help="Publish to a separate broker (tcp://HOST:PORT) instead of the embedded one, or to NATS JetStream "
    "(nats://[USER:PASS@]HOST:PORT or tls://..., comma-separated seed servers).",
)
@option("--broker-port", type=PORT, default=5555, envvar=env("BROKER_PORT"), help="Embedded broker's ZeroMQ port on 127.0.0.1 (0 = any free port).")
@option(
    "--http-host",
    default="127.0.0.1",
    envvar=env("HTTP_HOST"),
    help="HTTP address: the embedded broker's, or with --broker-url the streamer's own (/healthz, /readyz, /metrics).",
)
@option(
    "--http-port",
    type=PORT,
    default=None,
    envvar=env("HTTP_PORT"),
    help="HTTP port (0 = any free port)  [default: 8080; with --broker-url 8081, beside a broker on 8080]",
)
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
    "--delimiter",
    default="auto",
    callback=_delimiter,
    envvar=env("DELIMITER"),
    help="Field delimiter: auto (an Excel sep= line, else sniffed from the header and first rows), tab, or one character such as , ; |.",
)
@option("--encoding", default="utf-8", callback=_encoding, envvar=env("ENCODING"), help="Text encoding of the CSV (a byte-order mark overrides it).")
@option("--skip-rows", type=click.IntRange(min=0), default=0, envvar=env("SKIP_ROWS"), help="Lines to skip before the header (a preamble).")
@option("--comment", default=None, callback=_comment, envvar=env("COMMENT"), help="Skip lines starting with this character (e.g. #).")
@option(
    "--null-value",
    "null_values",
    multiple=True,
    envvar=env("NULL_VALUE"),
    metavar="TEXT",
    help="A value published as JSON null (repeatable); [N/A] and [Not Supported] always are.",
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
    default=1.0,
    envvar=env("LINGER"),
    help="Below 100 messages/s per worker: seconds a due message may wait to be sent with the others due (each keeps its due time as timestamp); 0 = send each at once.",
)
@replay_options(option, env)
@consumer_options(ENV_PREFIX)
@limit_options(ENV_PREFIX)
@persistence_options(ENV_PREFIX)
@nats_options()
@curve_server_options(ENV_PREFIX)
@curve_client_options(ENV_PREFIX)
@http_security_options(ENV_PREFIX)
@option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info", envvar=env("LOG_LEVEL"), help="Least severe level logged.")
@option("--log-format", type=click.Choice(FORMATS), default="text", envvar=env("LOG_FORMAT"), help="text for people, json for log pipelines.")
def command(
    csv_specs,
    workers,
    rate,
    topic,
    broker_url,
    broker_port,
    http_host,
    http_port,
    shutdown_timeout,
    column_types,
    delimiter,
    encoding,
    skip_rows,
    comment,
    null_values,
    buffer_messages,
    linger,
    max_message_bytes,
    log_level,
    log_format,
    subscriber_queue,
    ack_timeout,
    max_deliveries,
    nats_creds,
    nats_nkey,
    nats_tls_ca,
    nats_tls_cert,
    nats_tls_key,
    nats_stream,
    nats_create_stream,
    nats_replicas,
    nats_storage,
    nats_max_bytes,
    nats_max_age,
    nats_duplicate_window,
    nats_connect_wait,
    curve_secret_key,
    curve_authorized_keys,
    curve_server_key,
    curve_client_key,
    http_token_file,
    http_tls_cert,
    http_tls_key,
    **persistence,
):
    """Stream a CSV file's rows as timestamped JSON messages into a topic, from N worker processes."""
    if persistence["persistence"] and broker_url:
        raise click.UsageError("--persistence belongs to the broker: with --broker-url, give it to `telemetry-broker serve` instead")
    if broker_url and (curve_secret_key or curve_authorized_keys):
        raise click.UsageError(
            "--curve-secret-key/--curve-authorized-keys belong to the broker: with --broker-url, give --curve-server-key and --curve-client-key"
        )
    if not broker_url and (curve_server_key or curve_client_key):
        raise click.UsageError(
            "--curve-server-key/--curve-client-key are for --broker-url (the embedded broker takes --curve-secret-key and --curve-authorized-keys)"
        )
    if is_nats_url(broker_url) and (curve_server_key or curve_client_key):
        raise click.UsageError("--curve-* keys are for our broker (tcp://): NATS takes --nats-creds, --nats-nkey or --nats-tls-*")
    replay_values = {name: persistence.pop(name) for name in REPLAY_OPTIONS}  # the rest are persistence options
    limits = limits_config(persistence)
    persistence_cfg = persistence_config(**persistence)
    if http_port is None:
        http_port = 8081 if broker_url and not is_nats_url(broker_url) else 8080  # beside a separate broker on 8080
    fmt = CsvFormat(delimiter=delimiter, encoding=encoding, skip_rows=skip_rows, comment=comment, null_values=tuple(null_values))
    nats = None
    if is_nats_url(broker_url):
        nats = NatsConfig(
            connection=connection_from_options(broker_url, nats_creds, nats_nkey, nats_tls_ca, nats_tls_cert, nats_tls_key),
            stream=nats_stream,
            create_stream=nats_create_stream,
            replicas=nats_replicas,
            storage=nats_storage,
            max_bytes=nats_max_bytes,
            max_age=nats_max_age,
            duplicate_window=nats_duplicate_window,
            connect_wait=nats_connect_wait,
        )
    elif nats_create_stream or nats_creds or nats_nkey or nats_tls_ca or nats_tls_cert:
        raise click.UsageError("--nats-* options need a nats:// or tls:// --broker-url")
    curve_cfg = curve_config(curve_secret_key, curve_authorized_keys)
    curve_client = client_keys(curve_server_key, curve_client_key)
    http_cfg = http_security(http_token_file, http_tls_cert, http_tls_key)
    try:
        paths = expand(csv_specs)
    except InputError as exc:
        raise click.ClickException(f"cannot stream {exc}") from None
    once = [p for p in paths if not rereadable(p)]
    if once and workers > 1:
        what = "standard input" if STDIN in once else once[0]
        raise click.UsageError(f"{what} can be read only once: use --workers=1 with it")
    if paths.count(STDIN) > 1:
        raise click.UsageError("standard input (-) given more than once")
    checked = []
    for path in paths:
        if path in once:
            continue
        try:
            checked.append(check_csv(path, fmt))
        except CsvError as exc:
            raise click.ClickException(f"cannot stream {exc}") from None
    columns = {name for c in checked for name in c.header}
    unknown = [name for name in column_types if name not in columns]
    if unknown and not once:
        shown = ", ".join(dict.fromkeys(name for c in checked for name in c.header))
        raise click.BadParameter(f"no column named {unknown[0]!r} in {', '.join(paths)} (columns: {shown})", param_hint="'--column-type'")
    replay_cfg, total_rate = _replay(replay_values, workers, paths, checked, column_types, fmt, max_message_bytes, bool(once))
    if total_rate is not None:
        rate = total_rate
    cfg = StreamerConfig(
        workers=workers,
        worker=WorkerConfig(
            csv=tuple(paths),
            csv_format=fmt,
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
            replay=replay_cfg,
            nats=nats,
            curve=curve_client,
        ),
        progress=not replay_values["no_progress"] and sys.stderr.isatty(),
        http_host=http_host,
        http_port=http_port,
        http_security=http_cfg,
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
            ack_timeout_s=ack_timeout,
            max_deliveries=max_deliveries,
            curve=curve_cfg,
            http_security=http_cfg,
            limits=limits,
        ),
    )
    setup_logging(log_level, log_format, component="streamer")
    log = logging.getLogger("streamer")
    for c in checked:
        shown = "tab" if c.delimiter == "\t" else repr(c.delimiter)
        log.info("CSV %s: delimiter %s (%s), columns %s", c.path, shown, c.delimiter_from, ", ".join(c.header))
    for path in once:
        log.info("CSV %s: read once (it cannot be read again); the streamer drains and exits at its end", "standard input" if path == STDIN else path)
    return _serve(cfg)


def _replay(values: dict, workers, paths, checked, column_types, fmt, max_message_bytes, read_once):
    """The replay options' config (streamer.replay_options) and the per-worker rate of --total-rate."""
    from .csvsource import CsvSource

    columns = list(dict.fromkeys(name for c in checked for name in c.header))

    def first_row() -> bytes:
        try:
            rows = CsvSource([c.path for c in checked], column_types, fmt=fmt, max_message_bytes=max_message_bytes).take(1)
        except (OSError, CsvError) as exc:
            raise click.ClickException(f"cannot stream {exc}") from None
        return rows[0]

    return replay_config(values, workers=workers, columns=columns, first_row=first_row, read_once=read_once)


def _serve(cfg: StreamerConfig) -> int:
    import uvloop

    from broker.server import BrokerStartError

    from .supervisor import Supervisor

    try:
        return uvloop.run(Supervisor(cfg).run())
    except BrokerStartError as exc:
        raise click.ClickException(str(exc)) from None


def main() -> None:
    commandline.run(command, "telemetry-streamer", log_format_env=env("LOG_FORMAT"))
