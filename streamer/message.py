"""The message envelope, built per message on the hot path.

    {"timestamp":"2025-10-17T13:27:41.129926216Z","fields":{...}}

`timestamp` is the processing time (RFC 3339, UTC, nanoseconds, `Z`); `fields` is the row's
pre-encoded JSON object from `streamer.csvsource`, spliced in unchanged. A batch is the
newline-joined messages (the wire protocol's batch body, see `broker.protocol`).

Per message this costs one clock read and one bytes format: the "YYYY-MM-DDTHH:MM:SS." prefix
is rebuilt only when the second changes.
"""

from __future__ import annotations

from time import time_ns

from common.timefmt import second_prefix

_NS = 1_000_000_000


class Envelope:
    """Wraps encoded `fields` objects into timestamped messages."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def _prefix_for(self, second: int) -> bytes:
        self._second = second
        self._prefix = b'{"timestamp":"' + second_prefix(second).encode()
        return self._prefix

    def batch_at(self, rows: list[bytes], first_ns: int, step_ns: int) -> bytes:
        """The batch body for rows that fell due at first_ns, first_ns + step_ns, ... (a rate
        limit's lingering chunk, see streamer.rate): each stamped with its own due time."""
        out = []
        append = out.append
        for i, fields in enumerate(rows):
            due = first_ns + i * step_ns
            second = due // _NS
            prefix = self._prefix if second == self._second else self._prefix_for(second)
            append(b'%s%09dZ","fields":%s}' % (prefix, due - second * _NS, fields))
        return b"\n".join(out)

    def batch_keyed(self, rows: list[bytes], keys: list[bytes], times_ns: list[int] | None = None) -> bytes:
        """The batch body for keyed rows (replay's --key-columns): each message carries its key
        (JSON string bytes) as `"key"`, stamped with times_ns, or as it is built when None.

            {"timestamp":"2025-10-17T13:27:41.129926216Z","key":"node-1/0","fields":{...}}
        """
        out = []
        append = out.append
        for i, fields in enumerate(rows):
            due = time_ns() if times_ns is None else times_ns[i]
            second = due // _NS
            prefix = self._prefix if second == self._second else self._prefix_for(second)
            append(b'%s%09dZ","key":%s,"fields":%s}' % (prefix, due - second * _NS, keys[i], fields))
        return b"\n".join(out)

    def batch_times(self, rows: list[bytes], times_ns: list[int]) -> bytes:
        """The batch body for rows stamped with their own times (replay's original or shifted
        times, see streamer.replay), one per row."""
        out = []
        append = out.append
        for fields, due in zip(rows, times_ns):
            second = due // _NS
            prefix = self._prefix if second == self._second else self._prefix_for(second)
            append(b'%s%09dZ","fields":%s}' % (prefix, due - second * _NS, fields))
        return b"\n".join(out)

    def batch(self, rows: list[bytes]) -> bytes:
        """The batch body for these rows: one message per row, each stamped as it is built."""
        out = []
        append = out.append
        second, prefix = self._second, self._prefix
        for fields in rows:
            now = time_ns()
            if now // _NS != second:
                second = now // _NS
                prefix = self._prefix_for(second)
            append(b'%s%09dZ","fields":%s}' % (prefix, now - second * _NS, fields))
        return b"\n".join(out)
