"""The broker's configuration: one frozen dataclass, built by a CLI from its options."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class PersistenceConfig:
    directory: str = "/tmp/mq-data"  # one subdirectory per topic
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
