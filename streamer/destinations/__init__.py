"""Where a worker's messages go: one small interface, one module per kind of destination.

The worker's loop only ever talks to a `Destination`:

    await dest.start()                      connect; raise DestinationError if it cannot work at all
    await dest.publish(body, count)         `count` newline-joined messages; waits while the window
                                            of unacknowledged messages is full (backpressure)
    dest.published / unacked / lost_by_broker     counters, read any time
    dest.on_acknowledged = callback         called (no arguments) whenever acknowledgments arrive
    await dest.report(counters)             the worker's own counters (name, skipped rows), if the
                                            destination keeps them anywhere
    await dest.flush(timeout) -> bool       wait until everything published is acknowledged
    await dest.close()

A message counts as published only once the destination acknowledged it. Each destination
numbers messages with its `producer_id` and a sequence so that a resend is de-duplicated.

Kinds: `zeromq` (our broker, embedded or standalone: tcp:// and ipc:// URLs) and `nats`
(NATS JetStream: nats:// and tls:// URLs).
"""

from __future__ import annotations

from typing import Protocol


class DestinationError(Exception):
    """The destination cannot be used (unreachable, refused, misconfigured); one line for the user."""


class Destination(Protocol):
    producer_id: bytes
    published: int
    lost_by_broker: int
    on_acknowledged: object  # None, or a callable of no arguments

    @property
    def unacked(self) -> int: ...

    async def start(self) -> None: ...

    async def publish(self, body: bytes, count: int) -> None: ...

    async def report(self, counters: dict) -> None: ...

    async def flush(self, timeout: float) -> bool: ...

    async def close(self) -> None: ...


def kind_of(url: str) -> str:
    """`nats` for nats:// and tls:// URLs (a comma-separated list of seed servers), else `zeromq`."""
    return "nats" if url.split("://", 1)[0] in ("nats", "tls") else "zeromq"


def open_destination(cfg) -> Destination:
    """The destination a worker's config names (cfg: streamer.config.WorkerConfig)."""
    if kind_of(cfg.broker_url) == "nats":
        from .nats import NatsDestination  # nats-py is imported only by workers that use it

        return NatsDestination(cfg)
    from .zeromq import ZeroMQDestination

    return ZeroMQDestination(cfg)
