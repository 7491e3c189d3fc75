"""The streamer's configuration: one frozen dataclass per process, built by `streamer.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.config import BrokerConfig, HttpSecurity
from broker.curve import ClientKeys
from common.natsconn import NatsConnection

from .csvsource import CsvFormat


@dataclass(frozen=True)
class ReplayConfig:
    """How rows are chosen, paced and stamped (streamer.replay); the defaults are the plain loop."""

    passes: int = 0  # passes over the file, then drain and exit; 0 = forever
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, accepted values): rows must match every one
    key_columns: tuple[str, ...] = ()  # a message's key: these columns' values joined by "/"
    shard: bool = False  # split rows across workers (by key when keys are set) instead of every worker sending all
    pace: str = "rate"  # rate | timestamps
    speed: float = 1.0  # pace=timestamps: recording seconds per wall second
    timestamp_column: str = ""  # the rows' own time (found by the CLI when not given)
    max_gap: float = 60.0  # pace=timestamps: a longer gap in the recording is shortened to this
    timestamps: str = "now"  # message timestamp: now | original | shifted
    counter_columns: tuple[str, ...] = ()  # raised each pass by their increase over one pass (per key)
    profile: object = None  # streamer.profile.Profile: the total rate over time
    workers: int = 1  # how many workers share the rows (shard) and the profile's rate

    @property
    def decodes_rows(self) -> bool:
        """Whether a row's values are needed (else rows pass through as encoded)."""
        return bool(self.filters or self.key_columns or self.timestamp_column or self.counter_columns)

    @property
    def active(self) -> bool:
        return bool(self.passes or self.decodes_rows or self.shard or self.pace != "rate" or self.timestamps != "now" or self.profile)


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
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    anchor_ns: int = 0  # wall time (ns) every worker's schedule and shifted timestamps start from; set by the supervisor
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
    progress: bool = False  # a progress bar on the terminal
