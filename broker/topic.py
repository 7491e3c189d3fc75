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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from common.timefmt import rfc3339

from .groups import Group
from .protocol import DUPLICATE, SEPARATOR
from .segmentlog import TopicLog, read_batches
from .stats import RateWindow

MEMORY_WINDOW_BYTES = 64 << 20  # recent batches a topic without persistence keeps for replay


class MemoryBudget:
    """The bytes that memory-only topics keep for replay, broker-wide (--max-memory-bytes).
    Over the budget, the topic holding the most gives up its oldest batch first: topics created
    to fill memory cannot hold more than the budget together, and a small topic keeps its own."""

    __slots__ = ("limit", "used", "topics")

    def __init__(self, limit: int = 256 << 20, topics: dict | None = None):
        self.limit = limit
        self.used = 0
        self.topics = topics  # name -> Topic: the broker's (None: only the topic that appends)

    def reclaim(self, appending: Topic) -> None:
        while self.used > self.limit:
            holders = [t for t in (self.topics.values() if self.topics else (appending,)) if t.recent]
            if not holders:
                return
            max(holders, key=lambda t: t.recent_bytes).drop_oldest()


class Span(NamedTuple):
    """Consecutive messages of one producer batch, as accepted: what is stored, delivered, replayed."""

    first_offset: int
    count: int
    body: bytes  # the messages joined by b"\n"
    producer: bytes = b""
    first_seq: int = 0
    received_ns: int = 0

    def from_offset(self, offset: int) -> Span:
        """This span without its messages before `offset`."""
        skip = offset - self.first_offset
        if skip <= 0:
            return self
        return Span(offset, self.count - skip, self.body.split(SEPARATOR, skip)[skip], self.producer, self.first_seq + skip, self.received_ns)


@dataclass(slots=True)
class Producer:
    next_seq: int
    messages: int = 0
    bytes: int = 0
    duplicates: int = 0
    last_seen: float = 0.0  # wall clock, for display
    report: dict = field(default_factory=dict)  # the producer's latest REPORT


class ProducerLimit(Exception):
    """The topic tracks --max-producers producers already; a new one must wait until one expires."""


class SequenceGap(Exception):
    """The batch starts past the producer's next expected sequence number."""

    def __init__(self, expected: int):
        super().__init__(expected)
        self.expected = expected


class Topic:
    def __init__(self, name: str, log: TopicLog | None = None, max_producers: int = 1000, memory: MemoryBudget | None = None):
        self.name = name
        self.memory = memory if memory is not None else MemoryBudget()  # shared by every topic of a broker
        self.max_producers = max_producers
        self.log = log  # the disk-persisted log, or None for a memory-only topic
        self.next_offset = 0
        self.messages = 0
        self.bytes = 0
        self.duplicates = 0
        self.acks = 0  # acknowledgments sent (one per accepted or duplicate batch)
        self.producers: dict[bytes, Producer] = {}
        # latest REPORTs of producers that have not published (yet): a worker whose every row is
        # skipped still shows what it skipped (bounded: the oldest are forgotten)
        self.silent_reports: dict[bytes, dict] = {}
        self.rejected: Counter = Counter()  # invalid batches, by reason
        self.recent: deque[Span] = deque()  # without persistence: the last MEMORY_WINDOW_BYTES accepted
        self.recent_bytes = 0
        self.subscriptions: dict = {}  # key -> broker.subscriptions.Subscription
        self.groups: dict[str, Group] = {}
        self.created = time.monotonic()
        self.rate_window = RateWindow(self.created)
        if log is not None:  # continue where the log ends, and keep recognising retries
            self.next_offset = log.next_offset
            now = time.time()  # from here on they may expire like any other
            self.producers = {pid: Producer(next_seq=seq, last_seen=now) for pid, seq in log.producers.items()}

    def append(self, producer_id: bytes, first_seq: int, count: int, body: bytes) -> Span:
        """Accept a batch; returns the Span stored (first offset DUPLICATE and count 0 if none).

        Raises SequenceGap when messages before `first_seq` are missing, ProducerLimit for a new
        producer beyond max_producers, and LogUnavailable when the log cannot store the batch
        (then nothing about the topic has changed).
        """
        producer = self.producers.get(producer_id)
        if producer is None:
            if len(self.producers) >= self.max_producers:
                raise ProducerLimit()
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
                return Span(DUPLICATE, 0, b"")
            body = body.split(SEPARATOR, held)[held]
            count -= held
        received = time.time_ns()
        if self.log is not None:
            self.log.append(producer_id, expected, count, body, received)
        if held:
            producer.duplicates += held
            self.duplicates += held
        first_offset = self.next_offset
        self.next_offset += count
        self.messages += count
        size = len(body) - count + 1  # message bytes, without separators
        self.bytes += size
        producer.next_seq = expected + count
        producer.messages += count
        producer.bytes += size
        span = Span(first_offset, count, body, producer_id, expected, received)
        if self.log is None:
            self._remember(span)
        return span

    def _remember(self, span: Span) -> None:
        """Keep the batch for replay within this topic's window (64 MiB) and the broker's budget."""
        size = len(span.body)
        self.recent.append(span)
        self.recent_bytes += size
        self.memory.used += size
        while self.recent_bytes > MEMORY_WINDOW_BYTES and len(self.recent) > 1:
            self.drop_oldest()
        self.memory.reclaim(self)

    def drop_oldest(self) -> None:
        freed = len(self.recent.popleft().body)
        self.recent_bytes -= freed
        self.memory.used -= freed

    @property
    def first_offset(self) -> int:
        """The oldest offset the topic still holds."""
        if self.log is not None:
            return self.log.first_offset
        return self.recent[0].first_offset if self.recent else self.next_offset

    def history(self, from_offset: int, from_time_ns: int | None = None) -> Iterator[Span]:
        """What the topic still holds from `from_offset` (and `from_time_ns`), oldest first: the log
        with persistence, else the recent-batches window."""
        if self.log is not None:
            batches = read_batches(self.log.directory, from_offset, from_time_ns, self.log.written)
            spans = (Span(b.base_offset, b.count, b.payload, b.producer, b.base_seq, b.received_ns) for b in batches)
        else:
            spans = (s for s in list(self.recent) if s.first_offset + s.count > from_offset and (from_time_ns is None or s.received_ns >= from_time_ns))
        for span in spans:
            yield span.from_offset(from_offset)

    def expire_producers(self, idle_before: float) -> int:
        """Forget producers last seen before `idle_before` (wall clock): their counters, report
        and de-duplication state. A producer that comes back afterwards is taken as new: a batch
        it resends from before its expiry is stored again (see the README's "Limits")."""
        idle = [pid for pid, producer in self.producers.items() if producer.last_seen < idle_before]
        for pid in idle:
            del self.producers[pid]
        return len(idle)

    def sample_rate(self, now: float) -> None:
        """Called about once a second: remembers the message count for the rate window."""
        self.rate_window.sample(now, self.messages)

    def rate(self, now: float) -> float:
        return self.rate_window.rate(now, self.messages)

    def skipped(self) -> dict[str, int]:
        """Rows the producers skipped, by reason (summed over their latest reports)."""
        total: Counter = Counter()
        for producer in self.producers.values():
            total.update(producer.report.get("skipped", {}))
        for pid, report in self.silent_reports.items():
            if pid not in self.producers:
                total.update(report.get("skipped", {}))
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
            "acknowledgments": self.acks,
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
            "subscribers": {str(key): sub.stats() for key, sub in self.subscriptions.items()},
            "groups": {name: group.stats(self.next_offset) for name, group in self.groups.items()},
            "uptime_s": round(now - started, 3),
            **({"persistence": self.log.stats()} if self.log is not None else {"memory": {"first_offset": self.first_offset, "bytes": self.recent_bytes}}),
        }
