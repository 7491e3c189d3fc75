"""Our own broker (embedded or standalone) as a destination: `broker.client.Publisher`, which
already speaks the interface (bounded window, resends, de-duplication by producer id and
sequence)."""

from __future__ import annotations

from broker.client import Publisher


class ZeroMQDestination(Publisher):
    def __init__(self, cfg):
        super().__init__(cfg.broker_url, cfg.topic, window=cfg.buffer_messages, curve=cfg.curve)
