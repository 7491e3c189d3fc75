"""Warnings at a bounded rate: garbage from the network cannot flood the log."""

from __future__ import annotations

import time

INTERVAL_S = 10.0


class LogThrottle:
    """At most one warning of a kind per `interval_s`."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._logged_at: dict[str, float] = {}

    def may_log(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._logged_at.get(kind, -1e9) < self.interval_s:
            return False
        self._logged_at[kind] = now
        return True
