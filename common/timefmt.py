"""RFC 3339 UTC timestamps, written one way everywhere: `2025-10-17T13:27:41.129926216Z`.

`rfc3339_ns` is for a single value (stats, logs, tools). The streamer's hot path
(`streamer.message.Envelope`) builds the same text per message from `second_prefix`, rebuilt
only when the second changes."""

from __future__ import annotations

import time

NS = 1_000_000_000


def second_prefix(second: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS.` for a whole second since the epoch (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))


def rfc3339_ns(ns: int, digits: int = 9) -> str:
    """Nanoseconds since the epoch as RFC 3339 UTC with `digits` fractional digits (3, 6 or 9)."""
    seconds, fraction = divmod(ns, NS)
    return f"{second_prefix(seconds)}{fraction // 10 ** (9 - digits):0{digits}d}Z"


def rfc3339(epoch_s: float, digits: int = 6) -> str:
    """Seconds since the epoch (a float, as time.time()) as RFC 3339 UTC."""
    return rfc3339_ns(int(epoch_s * NS), digits)
