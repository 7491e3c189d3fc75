"""`telemetry-broker`: run the broker on its own (`serve`), read a persisted topic (`dump`),
follow a topic live (`tail`).

Every option can also be set from the environment as TELEMETRY_BROKER_<OPTION>
(TELEMETRY_BROKER_PORT=5555, TELEMETRY_BROKER_HOST=0.0.0.0, ...).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import stat
import sys

import click

from common import commandline
from common.logsetup import FORMATS, LEVELS, setup_logging
from common.names import valid_topic
from common.natsconn import connection_from_options, connection_options, failure, is_nats_url, valid_nats_url
from common.options import Size, Timestamp, bool_flag
from common.timefmt import rfc3339_ns

from .config import BrokerConfig
from .options import (
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
    persistence_dir_option,
    persistence_options,
)
from .protocol import MAX_MESSAGE_BYTES
from .segmentlog import read_records

log = logging.getLogger("broker")
PORT = click.IntRange(0, 65535)
option = functools.partial(click.option, show_envvar=True)


def env(name: str) -> str:
    return "TELEMETRY_BROKER_" + name


@click.group(context_settings={"show_default": True, "max_content_width": 100})
def command():
    """The telemetry-streamer message broker."""


@command.command()
@option("--host", default="127.0.0.1", envvar=env("HOST"), help="ZeroMQ bind address (0.0.0.0 in a cluster).")
@option("--port", type=PORT, default=5555, envvar=env("PORT"), help="ZeroMQ port (0 = any free port).")
@option("--http-host", default=None, envvar=env("HTTP_HOST"), help="HTTP bind address [default: same as --host].")
@option("--http-port", type=PORT, default=8080, envvar=env("HTTP_PORT"), help="HTTP port (0 = any free port).")
@option("--max-message-bytes", type=Size(minimum=64), default=MAX_MESSAGE_BYTES, envvar=env("MAX_MESSAGE_BYTES"), help="Largest message accepted.")
@consumer_options("TELEMETRY_BROKER_")
@limit_options("TELEMETRY_BROKER_")
@persistence_options("TELEMETRY_BROKER_")
@curve_server_options("TELEMETRY_BROKER_")
@http_security_options("TELEMETRY_BROKER_")
@option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default="info", envvar=env("LOG_LEVEL"), help="Least severe level logged.")
@option("--log-format", type=click.Choice(FORMATS), default="text", envvar=env("LOG_FORMAT"), help="text for people, json for log pipelines.")
def serve(
    host,
    port,
    http_host,
    http_port,
    max_message_bytes,
    subscriber_queue,
    ack_timeout,
    max_deliveries,
    curve_secret_key,
    curve_authorized_keys,
    http_token_file,
    http_tls_cert,
    http_tls_key,
    log_level,
    log_format,
    **persistence,
):
    """Serve producers over ZeroMQ and stats over HTTP until SIGINT/SIGTERM (SIGHUP: reread the CURVE authorized keys)."""
    limits = limits_config(persistence)
    cfg = BrokerConfig(
        limits=limits,
        host=host,
        port=port,
        http_host=http_host or host,
        http_port=http_port,
        max_message_bytes=max_message_bytes,
        subscriber_queue=subscriber_queue,
        ack_timeout_s=ack_timeout,
        max_deliveries=max_deliveries,
        persistence=persistence_config(**persistence),
        curve=curve_config(curve_secret_key, curve_authorized_keys),
        http_security=http_security(http_token_file, http_tls_cert, http_tls_key),
    )
    setup_logging(log_level, log_format, component="broker")
    import uvloop

    from .server import BrokerFailed, BrokerStartError

    try:
        return uvloop.run(_serve(cfg))
    except BrokerStartError as exc:
        raise click.ClickException(str(exc)) from None
    except BrokerFailed as exc:  # the traceback is logged already; exit non-zero so that a supervisor restarts it
        raise click.ClickException(f"the broker stopped: {exc}") from None


async def _serve(cfg: BrokerConfig) -> int:
    """start, serve until a signal, drain, close (Broker.run); a second signal exits at once;
    SIGHUP rereads the CURVE authorized keys."""
    from .server import Broker

    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)  # a second signal: exit now, without waiting for anything
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    broker = Broker(cfg)

    async def reload_on_sighup() -> None:
        while True:
            await reload.wait()
            reload.clear()
            broker.reload_keys()

    reloading = asyncio.create_task(reload_on_sighup())
    try:
        await broker.run(stop)
    finally:
        reloading.cancel()
    topic_counts = ", ".join(f"{name}={topic.messages}" for name, topic in broker.topics.items())
    log.info("Broker stopped: accepted %s", topic_counts or "nothing")
    return 0


@command.command()
@persistence_dir_option("TELEMETRY_BROKER_", "The broker's --persistence-dir.")
@option("--topic", default="telemetry", envvar=env("TOPIC"), help="Topic to print.")
@option("--from-offset", type=click.IntRange(min=0), default=0, envvar=env("FROM_OFFSET"), help="First offset to print.")
@bool_flag("--meta", envvar=env("META"), show_envvar=True, help="Wrap each message with its offset, producer, seq and receive time.")
def dump(persistence_dir, topic, from_offset, meta):
    """Print a topic's log as JSON lines, in offset order (works while a broker runs, or after it died)."""
    directory = os.path.join(persistence_dir, topic)
    if not valid_topic(topic) or not os.path.isdir(directory):
        raise click.ClickException(f"no log for topic {topic!r} in {persistence_dir}")
    setup_logging("warning", "text", component="dump")
    out = sys.stdout.buffer
    try:
        for offset, batch, message in read_records(directory, from_offset):
            if meta:
                out.write(
                    b'{"offset":%d,"producer":"%s","seq":%d,"received":"%s","message":%s}\n'
                    % (offset, batch.producer.hex().encode(), batch.base_seq + offset - batch.base_offset, rfc3339_ns(batch.received_ns).encode(), message)
                )
            else:
                out.write(message + b"\n")
        out.flush()
    except BrokenPipeError:  # `| head` closed the pipe: that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


@command.command()
@option("--broker-url", default="tcp://127.0.0.1:5555", envvar=env("URL"), help="The broker's ZeroMQ address, or NATS servers (nats://..., tls://...).")
@option("--topic", default="telemetry", envvar=env("TOPIC"), help="Topic to follow.")
@bool_flag(
    "--from-beginning",
    "--from-start",
    "from_beginning",
    envvar=env("FROM_BEGINNING"),
    show_envvar=True,
    help="Start with the oldest message the broker (or stream) holds.",
)
@option("--from-offset", type=click.IntRange(min=0), envvar=env("FROM_OFFSET"), help="Start at this offset (with NATS: this stream sequence).")
@option("--from-time", type=Timestamp(), envvar=env("FROM_TIME"), help="Start at the first message received at or after this time (RFC 3339).")
@bool_flag("--meta", envvar=env("META"), show_envvar=True, help="Wrap each message as `dump --meta` does.")
@option("--count", type=click.IntRange(min=1), envvar=env("COUNT"), help="Exit after this many messages.")
@option("--group", envvar=env("GROUP"), help="Consume as a member of this consumer group: each message printed is acknowledged.")
@option("--nats-stream", default="TELEMETRY", envvar=env("NATS_STREAM"), help="NATS: the JetStream stream to read.")
@connection_options("TELEMETRY_BROKER_")
@curve_client_options("TELEMETRY_BROKER_")
def tail(broker_url, topic, from_beginning, from_offset, from_time, meta, count, group, nats_stream, curve_server_key, curve_client_key, **nats_files):
    """Print a topic's messages as JSON lines as they arrive (new ones only, unless told where to start)."""
    if sum(x is not None and x is not False for x in (from_beginning or None, from_offset, from_time)) > 1:
        raise click.UsageError("give at most one of --from-beginning, --from-offset, --from-time")
    if not valid_topic(topic):
        raise click.BadParameter(f"{topic!r} is not a valid topic name", param_hint="'--topic'")
    if group is not None and (from_beginning or from_offset is not None or from_time is not None):
        raise click.UsageError("a --group reads from its committed offset: --from-* do not apply")
    if group is not None and not valid_topic(group):
        raise click.BadParameter(f"{group!r}: use 1-128 of A-Z a-z 0-9 . _ -", param_hint="'--group'")
    curve = client_keys(curve_server_key, curve_client_key)
    setup_logging("warning", "text", component="tail")
    import uvloop

    if is_nats_url(broker_url):
        if not valid_nats_url(broker_url):
            raise click.BadParameter(f"{broker_url!r} is not nats://[USER:PASS@]HOST[:PORT] (or tls://)", param_hint="'--broker-url'")
        if group is not None:
            raise click.UsageError("--group is for our broker; with NATS, create a durable JetStream consumer instead")
        connection = connection_from_options(broker_url, **nats_files)
        try:
            return uvloop.run(_tail_nats(connection, nats_stream, topic, from_beginning, from_offset, from_time, meta, count))
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception as exc:  # unreachable, refused, no such stream: one line
            reason = failure(exc) or str(exc).removeprefix("nats: ") or type(exc).__name__
            raise click.ClickException(f"cannot read stream {nats_stream!r} at NATS {connection.shown}: {reason}") from None

    from .client import Consumer, Subscriber

    if group is not None:
        subscriber = _GroupReader(Consumer(broker_url, topic, group, curve=curve))
    else:
        subscriber = Subscriber(broker_url, topic, from_beginning=from_beginning, from_offset=from_offset, from_time_ns=from_time, curve=curve)
    try:
        return uvloop.run(_tail(subscriber, meta, count))
    except BrokenPipeError:  # `| head` closed the pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _tail(subscriber, meta: bool, count: int | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    out = sys.stdout.buffer
    printed = 0
    if stat.S_ISFIFO(os.fstat(out.fileno()).st_mode):
        # a pipe whose reader left (`| head`) polls as an error on our end: stop now, not at the next write
        loop.add_reader(out.fileno(), stop.set)

    async def run() -> None:
        nonlocal printed
        await subscriber.start()
        async for first, messages in subscriber.batches():
            producer, first_seq, received = subscriber.last_batch
            for i, message in enumerate(messages):
                if meta:
                    out.write(
                        b'{"offset":%d,"producer":"%s","seq":%d,"received":"%s","message":%s}\n'
                        % (first + i, producer.hex().encode(), first_seq + i, rfc3339_ns(received).encode(), message)
                    )
                else:
                    out.write(message + b"\n")
                printed += 1
                if count is not None and printed >= count:
                    out.flush()
                    return
            out.flush()

    reading = asyncio.create_task(run())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (reading, stopping):
        task.cancel()
    results = await asyncio.gather(reading, stopping, return_exceptions=True)
    await subscriber.close()
    if isinstance(results[0], BrokenPipeError):
        raise results[0]
    if subscriber.missed:
        log.warning("tail: missed %d messages (this reader fell behind)", subscriber.missed)
    return 0


async def _tail_nats(connection, stream, topic, from_beginning, from_seq, from_time_ns, meta, count) -> int:
    from .natstail import tail

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await tail(
        connection,
        stream,
        topic,
        from_beginning=from_beginning,
        from_seq=from_seq,
        from_time_ns=from_time_ns,
        meta=meta,
        count=count,
        out=sys.stdout.buffer,
        stop=stop,
    )


class _GroupReader:
    """A group consumer with the Subscriber's reading interface, acknowledging what was printed."""

    def __init__(self, consumer):
        self.consumer = consumer
        self.missed = 0
        self.last_batch = (b"", 0, 0)
        self._printed: list[int] = []

    async def start(self) -> None:
        await self.consumer.start()

    async def batches(self):
        async for message in self.consumer:
            if self._printed:  # the previous one was written out: acknowledge it
                await self.consumer.ack(*self._printed)
            self.last_batch = (message.producer, message.seq, message.received_ns)
            self._printed = [message.offset]
            yield message.offset, [message.value]

    async def close(self) -> None:
        if self._printed:
            await self.consumer.ack(*self._printed)
        await self.consumer.close()


@command.command()
@click.argument("directory", type=click.Path(file_okay=False))
@option("--name", default="broker", envvar=env("KEYGEN_NAME"), help="The files' name: DIRECTORY/NAME.key (public) and NAME.key_secret (private, 0600).")
def keygen(directory, name):
    """Make a CURVE key pair (pyzmq's zmq.auth format): one for the broker, one per client.

    The broker takes its NAME.key_secret (--curve-secret-key); each client its own NAME.key_secret
    (--curve-client-key) and the broker's NAME.key (--curve-server-key); a client's NAME.key goes
    into the broker's --curve-authorized-keys directory."""
    from .curve import KeyFileError
    from .curve import keygen as make_keys

    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter(f"{name!r} is not a file name", param_hint="'--name'")
    try:
        public_file, secret_file = make_keys(directory, name)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {public_file}\nsecret key: {secret_file} (keep it private)")
    return 0


def main() -> None:
    commandline.run(command, "telemetry-broker", log_format_env="TELEMETRY_BROKER_LOG_FORMAT")
