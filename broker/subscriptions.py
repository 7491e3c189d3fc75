"""Live subscriptions and replay: each accepted batch reaches every live subscription of its
topic, over ZeroMQ (DELIVER frames, credit-based flow control) or Server-Sent Events (a queue
that broker.http drains). A subscription that starts in the past is replayed first, then goes live.

A subscription whose queue is full (no credit, or the SSE queue full) has new batches dropped and
counted: producers never wait for a subscriber. Replay never runs ahead of the credit granted: it
waits for more (each DELIVER spends one), and reads a persisted log off the event loop. What a
replay sent and the subscriber has not yet given credit back for is also bounded in bytes: at
most REPLAY_WINDOW_BYTES per subscription, and --max-replay-bytes for all replays together (a
replay read from disk is a copy per subscriber, unlike live batches, which all share one).
A topic has at most --max-subscribers ZeroMQ subscriptions; the broker at most --max-sse streams.
A ZeroMQ subscription without credit that has sent nothing for --subscriber-idle is dropped (a
subscriber that went away without UNSUBSCRIBE; a live client subscribes again when it hears nothing). At shutdown every subscription is told (`close_all`):
ZeroMQ subscribers get a CLOSING frame, SSE streams an `event: shutdown` and their end.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from . import protocol as p
from .config import BrokerConfig
from .topic import Span, Topic
from .transport import ZMQ_AGAIN, ZMQ_GONE, ZMQ_SENT, Transport

REPLAY_RETRY_S = 0.01
REPLAY_WINDOW_BYTES = 4 << 20  # replayed bytes one subscription may have unconsumed (beyond one batch)
IDLE_CHECK_S = 5.0
SSE_SHUTDOWN = None  # queued to an SSE subscription: the broker is going away


@dataclass(slots=True, eq=False)
class Subscription:
    """One subscription on the broker's side: over ZeroMQ (key: the peer's identity) or Server-Sent Events (a queue)."""

    key: object
    kind: str  # "zmq" or "sse"
    delivered: int = 0
    dropped: int = 0  # messages lost because its queue was full
    missed: int = 0  # dropped since the last delivery (told to the subscriber with the next one)
    live: bool = False  # caught up: receives new batches as they are accepted
    credit: int = 0  # zmq: DELIVERs it may still receive (credit-based flow control)
    queue: object = None  # sse: asyncio.Queue of (Span, missed), or SSE_SHUTDOWN
    credited: object = None  # zmq while replaying: an asyncio.Event set when credit arrives
    heard: float = 0.0  # zmq: when the subscriber last sent SUBSCRIBE or CREDIT (monotonic)
    unconsumed: deque = field(default_factory=deque)  # zmq while replaying: sizes of DELIVERs not yet credited back
    unconsumed_bytes: int = 0

    def stats(self) -> dict:
        stats = {"kind": self.kind, "delivered": self.delivered, "dropped": self.dropped, "live": self.live}
        if self.kind == "zmq":
            stats["credit"] = self.credit
        return stats


class Subscriptions:
    def __init__(self, config: BrokerConfig, transport: Transport):
        self.queue_limit = config.subscriber_queue
        self.max_subscribers = config.limits.max_subscribers
        self.max_sse = config.limits.max_sse
        self.max_replay_bytes = config.limits.max_replay_bytes
        self.subscriber_idle_s = config.limits.subscriber_idle_s
        self.replay_bytes = 0  # replayed and not yet credited back, all subscriptions together
        self.sse_open = 0
        self.transport = transport
        self._replays: dict[object, asyncio.Task] = {}
        self._sse_ids = itertools.count(1)

    def fan_out(self, topic: Topic, span: Span) -> None:
        """A durable span reaches the topic's live subscriptions."""
        for sub in list(topic.subscriptions.values()):
            if sub.live:
                self._deliver(topic, sub, span)

    def _deliver(self, topic: Topic, sub: Subscription, span: Span) -> None:
        """Queue one span for a live subscription; if its queue is full the span is dropped and counted."""
        if sub.kind == "sse":
            try:
                sub.queue.put_nowait((span, sub.missed))
            except asyncio.QueueFull:
                sent = ZMQ_AGAIN
            else:
                sent = ZMQ_SENT
        elif sub.credit <= 0:
            sent = ZMQ_AGAIN
        else:
            sub.credit -= 1
            sent = self.transport.send(
                sub.key,
                p.deliver_frames(topic.name.encode(), span.first_offset, span.count, sub.missed, span.producer, span.first_seq, span.received_ns, span.body),
            )
        if sent == ZMQ_SENT:
            sub.delivered += span.count
            sub.missed = 0
        elif sent == ZMQ_AGAIN:
            sub.dropped += span.count
            sub.missed += span.count
        else:
            self.unsubscribe(topic, sub.key)

    def subscribe(self, identity: bytes, topic: Topic, start: int, value: int, credit: int) -> str | None:
        """A ZeroMQ SUBSCRIBE (validated by broker.dispatch); subscribing again replaces the
        subscription. Returns why it was refused (the topic's --max-subscribers), else None."""
        if identity not in topic.subscriptions and sum(1 for s in topic.subscriptions.values() if s.kind == "zmq") >= self.max_subscribers:
            return "too many subscribers"
        self.unsubscribe(topic, identity)
        sub = topic.subscriptions[identity] = Subscription(identity, "zmq", credit=min(credit, self.queue_limit), heard=time.monotonic())
        if start == p.FROM_LIVE:
            sub.live = True
            return None
        from_offset = value if start == p.FROM_OFFSET else 0
        from_time = value if start == p.FROM_TIME else None
        sub.credited = asyncio.Event()
        self._replays[identity] = asyncio.create_task(self._replay(topic, sub, from_offset, from_time))
        return None

    def credit(self, identity: bytes, topic: Topic, credit: int) -> None:
        sub = topic.subscriptions.get(identity)
        if sub is not None:  # else e.g. after a broker restart: the subscriber subscribes again when it hears nothing
            sub.credit = min(sub.credit + credit, self.queue_limit)
            sub.heard = time.monotonic()
            if sub.credited is not None:  # replaying: the oldest `credit` DELIVERs were consumed
                for _ in range(min(credit, len(sub.unconsumed))):
                    self._release(sub, sub.unconsumed.popleft())
                sub.credited.set()

    def _release(self, sub: Subscription, size: int) -> None:
        sub.unconsumed_bytes -= size
        self.replay_bytes -= size

    def _release_all(self, sub: Subscription) -> None:
        self.replay_bytes -= sub.unconsumed_bytes
        sub.unconsumed_bytes = 0
        sub.unconsumed.clear()

    def _replay_blocked(self, sub: Subscription) -> bool:
        """No credit, or this subscription's (or all replays') unconsumed bytes at their bound.
        A subscription with nothing unconsumed may always have one batch."""
        if sub.credit <= 0:
            return True
        if not sub.unconsumed_bytes:
            return False
        return sub.unconsumed_bytes >= REPLAY_WINDOW_BYTES or self.replay_bytes >= self.max_replay_bytes

    def unsubscribe(self, topic: Topic, key: object) -> None:
        sub = topic.subscriptions.pop(key, None)
        if sub is not None and sub.kind == "sse":
            self.sse_open -= 1
        if sub is not None and sub.unconsumed_bytes:
            self._release_all(sub)
        task = self._replays.pop(key, None) if sub is not None else None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _replay(self, topic: Topic, sub: Subscription, from_offset: int, from_time: int | None) -> None:
        """Send what the topic holds from the start asked for, one DELIVER per credit, waiting (not
        dropping) while the subscriber has no credit or its queue is full; then, in the same step
        as the last check, go live. A persisted log is read off the event loop, a batch at a time."""
        cursor = from_offset
        name = topic.name.encode()
        loop = asyncio.get_running_loop()
        try:
            while cursor < topic.next_offset:
                spans = topic.history(cursor, from_time)
                while True:
                    while self._replay_blocked(sub):  # nothing is read, let alone sent, beyond the credit granted
                        sub.credited.clear()
                        if sub.credit > 0:  # waiting for other replays' bytes to be consumed
                            try:
                                await asyncio.wait_for(sub.credited.wait(), REPLAY_RETRY_S * 10)
                            except TimeoutError:
                                pass
                        else:
                            await sub.credited.wait()
                    span = next(spans, None) if topic.log is None else await loop.run_in_executor(None, next, spans, None)
                    if span is None:
                        break
                    sub.credit -= 1
                    while True:
                        sent = self.transport.send(
                            sub.key, p.deliver_frames(name, span.first_offset, span.count, 0, span.producer, span.first_seq, span.received_ns, span.body)
                        )
                        if sent != ZMQ_AGAIN:
                            break
                        await asyncio.sleep(REPLAY_RETRY_S)
                    if sent == ZMQ_GONE:
                        spans.close()
                        self.unsubscribe(topic, sub.key)
                        return
                    sub.delivered += span.count
                    size = len(span.body)
                    sub.unconsumed.append(size)
                    sub.unconsumed_bytes += size
                    self.replay_bytes += size
                    cursor = span.first_offset + span.count
                    from_time = None  # the time only picks the first batch
                    await asyncio.sleep(0)
                if from_time is not None:  # nothing at or after that time yet
                    cursor = topic.next_offset
                elif cursor < topic.next_offset and not await self._holds(topic, cursor):
                    cursor = topic.next_offset  # the rest is no longer held (retention)
            sub.live = True
            sub.credited = None
            self._release_all(sub)  # live batches are shared by all subscribers, not copies
        finally:
            self._replays.pop(sub.key, None)

    @staticmethod
    async def _holds(topic: Topic, cursor: int) -> bool:
        """Whether the topic still holds anything from `cursor` (a persisted log: read off the loop)."""
        if topic.log is None:
            return any(True for _ in topic.history(cursor))
        return await asyncio.get_running_loop().run_in_executor(None, lambda: any(True for _ in topic.history(cursor)))

    async def expire_idle(self, topics: dict[str, Topic]) -> None:
        """Drop ZeroMQ subscriptions without credit that have sent nothing for --subscriber-idle."""
        idle_s = self.subscriber_idle_s
        while True:
            await asyncio.sleep(min(IDLE_CHECK_S, idle_s / 4))
            idle_since = time.monotonic() - idle_s
            for topic in list(topics.values()):
                for key, sub in list(topic.subscriptions.items()):
                    if sub.kind == "zmq" and sub.credit <= 0 and sub.heard < idle_since:
                        self.unsubscribe(topic, key)

    def sse_allowed(self) -> bool:
        """Whether another Server-Sent Events stream may open (--max-sse)."""
        return self.sse_open < self.max_sse

    def add_sse(self, topic: Topic) -> Subscription:
        self.sse_open += 1
        key = f"sse-{next(self._sse_ids)}"
        sub = topic.subscriptions[key] = Subscription(key, "sse", live=True, queue=asyncio.Queue(self.queue_limit))
        return sub

    async def close_all(self, topics: dict[str, Topic]) -> None:
        """The broker is going away: stop replays, tell every subscription (ZeroMQ: CLOSING; SSE:
        SSE_SHUTDOWN after what is queued, so the stream ends with `event: shutdown`)."""
        replays = list(self._replays.values())
        for task in replays:
            task.cancel()
        await asyncio.gather(*replays, return_exceptions=True)
        for topic in topics.values():
            for sub in list(topic.subscriptions.values()):
                if sub.kind == "sse":
                    if sub.queue.full():  # the shutdown notice goes first: the oldest queued span gives way
                        span, _ = sub.queue.get_nowait()
                        sub.dropped += span.count
                    sub.queue.put_nowait(SSE_SHUTDOWN)
                else:
                    self.transport.send(sub.key, p.closing_frames(topic.name.encode()))
