"""The streamer's configuration: one frozen dataclass per process, built by `streamer.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import BrokerConfig, HttpSecurity
from broker.curve import ClientKeys
from common.natsconn import NatsConnection

from .csvsource import CsvFormat


@dataclass(frozen=True)
class NatsConfig:
    """Publishing to NATS JetStream (--broker-url nats://... or tls://...)."""

    connection: NatsConnection
    stream: str = "TELEMETRY"
    create_stream: bool = False  # create the stream (or add the topic to its subjects) if needed
    replicas: int = 1
    storage: str = "file"  # file | memory
    max_bytes: int | None = None  # None: unlimited
    max_age: float | None = None  # seconds; None: unlimited
    duplicate_window: float = 120.0  # seconds the server remembers a Nats-Msg-Id
    connect_wait: float = 15.0  # how long start-up waits for a server (and JetStream) to answer


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs; picklable, passed to it at spawn."""

    csv: tuple[str, ...]  # the inputs, in pass order ("-" is standard input)
    rate: float  # messages per second for this worker; 0 = unthrottled
    topic: str
    broker_url: str
    column_types: dict[str, str] = field(default_factory=dict)
    csv_format: CsvFormat = CsvFormat()
    shutdown_timeout: float = 10.0
    buffer_messages: int = 100_000  # unacknowledged messages held before reading pauses
    batch_messages: int = 4000  # largest batch sent in one frame
    linger: float = 1.0  # below 100 messages/s: how long a due message may wait to go with others
    max_message_bytes: int = 1 << 20  # rows whose message is larger are skipped and counted
    log_level: str = "info"
    log_format: str = "text"
    nats: NatsConfig | None = None  # set when broker_url is nats:// or tls://
    curve: ClientKeys | None = None  # connect with CURVE (--curve-server-key/--curve-client-key, or the embedded broker's own pair)


@dataclass(frozen=True)
class StreamerConfig:
    workers: int
    worker: WorkerConfig  # broker_url is empty when the broker is embedded
    broker: BrokerConfig | None  # the embedded broker's config, None with --broker-url
    http_host: str = "127.0.0.1"  # with --broker-url: the streamer's own /healthz, /readyz, /metrics
    http_port: int = 8080
    http_security: HttpSecurity = HttpSecurity()  # with --broker-url: the streamer's own HTTP (embedded: in `broker`)
