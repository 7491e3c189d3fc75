"""Producers' side of the broker: a valid batch is appended to its topic, and the burst's replies
go out once the burst is durable as the fsync policy asks (broker.storage).

Replies of one burst are kept as [identity, topic, frames, ack]; an ACK is kept as [producer,
first seq, count, first offset] so that the next batch of the same producer can join it (one ACK
per producer per burst instead of one per batch). An acknowledgment whose batch could not be
synced becomes a NACK "unavailable": the producer resends, and the resend is acknowledged as a
duplicate once the log is well.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import protocol as p
from .segmentlog import LogUnavailable
from .storage import FsyncPolicy
from .topic import ProducerLimit, SequenceGap, Span, Topic
from .transport import Transport


class Ingest:
    def __init__(self, transport: Transport, fsync: FsyncPolicy, burst_seconds, on_durable: Callable[[Topic, Span], None]):
        self.transport = transport
        self.fsync = fsync
        self.burst_seconds = burst_seconds  # a Histogram: from a burst received to its acknowledgments sent
        self.on_durable = on_durable  # a durable span reaches the topic's subscriptions and groups
        self._replies: list[list] = []
        self._last_reply: dict[bytes, list] = {}  # by identity, within the burst
        self._acked_in_burst = False
        self._fanout: list[tuple[Topic, Span]] = []  # handed on once the burst is durable

    def publish(self, identity: bytes, topic: Topic, producer_id: bytes, first_seq: int, count: int, body: bytes) -> None:
        """Append a batch (already validated by broker.dispatch) and queue its reply."""
        try:
            span = topic.append(producer_id, first_seq, count, body)
        except SequenceGap as gap:
            self.refuse(identity, topic, producer_id, first_seq, count, p.NACK_SEQUENCE, "sequence gap", gap.expected)
        except ProducerLimit:
            topic.rejected["producer_limit"] += count
            self.refuse(identity, topic, producer_id, first_seq, count, p.NACK_UNAVAILABLE, "too many producers on this topic; retry later")
        except LogUnavailable as exc:
            self.refuse(identity, topic, producer_id, first_seq, count, p.NACK_UNAVAILABLE, f"log write failed: {exc}")
        else:
            self._acked_in_burst = True
            if span.count and (topic.subscriptions or topic.groups):
                self._fanout.append((topic, span))
            last = self._last_reply.get(identity)
            ack = last[3] if last is not None and last[1] is topic else None
            if ack is not None and ack[0] == producer_id and ack[1] + ack[2] == first_seq and (ack[3] == p.DUPLICATE) == (span.first_offset == p.DUPLICATE):
                ack[2] += count  # the same producer's next batch: one ACK covers both
            else:
                self._reply(identity, topic, None, [producer_id, first_seq, count, span.first_offset])

    def refuse(self, identity: bytes, topic: Topic | None, producer_id: bytes, first_seq: int, count: int, code: bytes, reason: str, expected: int = 0) -> None:
        """Queue a NACK, in order with the burst's other replies."""
        self._reply(identity, topic, p.nack_frames(producer_id, first_seq, count, code, reason, expected))

    def _reply(self, identity: bytes, topic: Topic | None, frames: list[bytes] | None, ack: list | None = None) -> None:
        entry = [identity, topic, frames, ack]
        self._replies.append(entry)
        self._last_reply[identity] = entry

    def commit(self, started: float | None = None):
        """End of a burst: fsync what the policy wants synced, then send the replies, then hand
        the durable spans on. `started` (perf_counter) times the burst for the ack latency.
        Returns None when done, or (--fsync=always with something written) a coroutine that
        syncs off the event loop and then finishes; the receive loop awaits it before reading on."""
        replies, self._replies = self._replies, []
        self._last_reply.clear()
        fanout, self._fanout = self._fanout, []
        acked, self._acked_in_burst = self._acked_in_burst, False
        due = self.fsync.due_for_acks({id(t): t for _, t, _, _ in replies if t is not None}.values())
        if due:
            return self._finish_after_sync(due, replies, fanout, acked, started)
        self._finish(set(), replies, fanout, acked, started)
        return None

    async def _finish_after_sync(self, due, replies, fanout, acked, started) -> None:
        self._finish(await self.fsync.sync_for_acks(due), replies, fanout, acked, started)

    def _finish(self, failed: set[int], replies: list[list], fanout: list, acked: bool, started: float | None) -> None:
        send = self.transport.send
        for identity, topic, frames, ack in replies:
            if ack is not None:
                if id(topic) in failed:
                    frames = p.nack_frames(*ack[:3], p.NACK_UNAVAILABLE, f"log fsync failed: {topic.log.error}")
                else:
                    frames = p.ack_frames(*ack)
                    topic.acks += 1
            send(identity, frames)
        for topic, span in fanout:
            if id(topic) not in failed:
                self.on_durable(topic, span)
        if acked and started is not None:
            self.burst_seconds.observe(time.perf_counter() - started)
