"""The broker's configuration: one frozen dataclass, built by a CLI from its options."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class Limits:
    """What any peer may make the broker hold (see the README's "Limits")."""

    max_topics: int = 100  # only a PUBLISH creates a topic, and only below this many
    max_groups: int = 32  # consumer groups per topic
    max_producers: int = 1000  # producers a topic tracks (de-duplication state)
    producer_expiry_s: float | None = 3600.0  # a producer idle this long is forgotten (None: never)
    max_subscribers: int = 100  # ZeroMQ subscriptions per topic, and members per group
    subscriber_idle_s: float = 60.0  # a ZeroMQ subscription without credit that sent nothing this long is dropped
    max_replay_bytes: int = 256 << 20  # replayed bytes not yet consumed, all subscriptions together
    max_sse: int = 64  # Server-Sent Events streams, broker-wide
    max_report_bytes: int = 16 << 10  # one producer REPORT
    max_memory_bytes: int = 256 << 20  # without persistence: recent batches kept for replay, all topics together


@dataclass(frozen=True)
class PersistenceConfig:
    directory: str  # one subdirectory per topic (the CLIs default to a per-user state directory)
    segment_bytes: int = 64 << 20
    fsync: str = "interval"  # always | interval | never
    fsync_interval_s: float = 1.0
    retention_bytes: int = 1 << 30
    retention_age_s: float | None = None


@dataclass(frozen=True)
class CurveConfig:
    """CURVE on the ZeroMQ port (broker.curve): the broker's key pair and the allow-list directory."""

    secret_key_file: str
    authorized_keys_dir: str


@dataclass(frozen=True)
class HttpSecurity:
    """The HTTP side's protection (common.httpauth): a bearer token, HTTPS."""

    token: str | None = None  # every endpoint but /healthz, /readyz and the console's files wants it
    tls_cert: str | None = None  # both set: HTTPS
    tls_key: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"HttpSecurity(token={'set' if self.token else None}, tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r})"


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"  # ZeroMQ bind address
    port: int = 5555  # ZeroMQ port; 0 picks a free one
    http_host: str = "127.0.0.1"
    http_port: int = 8080  # 0 picks a free one
    max_message_bytes: int = MAX_MESSAGE_BYTES
    subscriber_queue: int = 100  # batches queued per subscriber before its new ones are dropped
    ack_timeout_s: float = 30.0  # a group's message not acknowledged this long is delivered again
    max_deliveries: int = 3  # then it goes to <topic>.dlq
    topics: tuple[str, ...] = ("telemetry",)  # created at start, so their stats answer at once
    persistence: PersistenceConfig | None = None  # None: topics live in memory only
    curve: CurveConfig | None = None  # None: the ZeroMQ port accepts any peer
    http_security: HttpSecurity = HttpSecurity()
    limits: Limits = Limits()
