"""A topic's state: offsets, per-producer sequence tracking (de-duplication) and statistics.

A topic accepts each producer's batches in sequence order. For a producer it has seen, a batch
that starts at the next expected sequence number is appended; one it already holds entirely is
a duplicate (acknowledged, not stored again); one that overlaps the end of what it holds has its
already-held head dropped; one that starts beyond it is refused with the expected number, so the
producer resends what is missing instead of leaving a hole. A producer the topic has not seen
starts wherever its first batch starts.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .log import TopicLog
from .protocol import DUPLICATE, SEPARATOR

RATE_WINDOW_S = 10.0


def rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s % 1 * 1e6):06d}Z"


@dataclass(slots=True)
class Producer:
    next_seq: int
    messages: int = 0
    bytes: int = 0
    duplicates: int = 0
    last_seen: float = 0.0  # wall clock, for display
    report: dict = field(default_factory=dict)  # the producer's latest REPORT


class SequenceGap(Exception):
    """The batch starts past the producer's next expected sequence number."""

    def __init__(self, expected: int):
        super().__init__(expected)
        self.expected = expected


class Topic:
    def __init__(self, name: str, log: TopicLog | None = None):
        self.name = name
        self.log = log  # the disk-persisted log, or None for a memory-only topic
        self.next_offset = 0
        self.messages = 0
        self.bytes = 0
        self.duplicates = 0
        self.producers: dict[bytes, Producer] = {}
        self.rejected: Counter = Counter()  # invalid batches, by reason
        self.created = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.created, 0)])
        if log is not None:  # continue where the log ends, and keep recognising retries
            self.next_offset = log.next_offset
            self.producers = {pid: Producer(next_seq=seq) for pid, seq in log.producers.items()}

    def append(self, producer_id: bytes, first_seq: int, count: int, body: bytes) -> tuple[int, int, bytes]:
        """Accept a batch; returns (first offset or DUPLICATE, messages stored, stored body).

        Raises SequenceGap when messages before `first_seq` are missing, and LogUnavailable when
        the log cannot store the batch (then nothing about the topic has changed).
        """
        producer = self.producers.get(producer_id)
        if producer is None:
            producer = self.producers[producer_id] = Producer(next_seq=first_seq)
        producer.last_seen = time.time()
        expected = producer.next_seq
        held = 0
        if first_seq != expected:
            if first_seq > expected:
                raise SequenceGap(expected)
            held = expected - first_seq
            if held >= count:
                producer.duplicates += count
                self.duplicates += count
                return DUPLICATE, 0, b""
            body = body.split(SEPARATOR, held)[held]
            count -= held
        if self.log is not None:
            self.log.append(producer_id, expected, count, body, time.time_ns())
        if held:
            producer.duplicates += held
            self.duplicates += held
        first_offset = self.next_offset
        self.next_offset += count
        self.messages += count
        self.bytes += len(body) - count + 1  # message bytes, without separators
        producer.next_seq = expected + count
        producer.messages += count
        producer.bytes += len(body) - count + 1
        return first_offset, count, body

    def sample_rate(self, now: float) -> None:
        """Called about once a second: remembers the message count for the rate window."""
        self._samples.append((now, self.messages))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()

    def rate(self, now: float) -> float:
        then, count = self._samples[0]
        return (self.messages - count) / (now - then) if now > then else 0.0

    def skipped(self) -> dict[str, int]:
        """Rows the producers skipped, by reason (summed over their latest reports)."""
        total: Counter = Counter()
        for producer in self.producers.values():
            total.update(producer.report.get("skipped", {}))
        return dict(total)

    def stats(self, started: float) -> dict:
        """The topic's figures; `started` is the broker's start (monotonic) for `uptime_s`."""
        now = time.monotonic()
        return {
            "topic": self.name,
            "messages": self.messages,
            "bytes": self.bytes,
            "rate": round(self.rate(now), 3),
            "next_offset": self.next_offset,
            "duplicates": self.duplicates,
            "producers": {
                pid.hex(): {
                    "name": p.report.get("name", ""),
                    "messages": p.messages,
                    "bytes": p.bytes,
                    "duplicates": p.duplicates,
                    "next_seq": p.next_seq,
                    "last_seen": rfc3339(p.last_seen),
                }
                for pid, p in self.producers.items()
            },
            "skipped": self.skipped(),
            "rejected": dict(self.rejected),
            "subscribers": {},
            "uptime_s": round(now - started, 3),
            **({"persistence": self.log.stats()} if self.log is not None else {}),
        }
