"""Python client for the broker's wire protocol (`broker.protocol`).

`Publisher` sends batches to one topic and counts a message as published only once the broker
has acknowledged it. Unacknowledged batches stay in a bounded window: the publisher waits for
room when it is full (backpressure, never a silent drop), resends them when acknowledgments stop
coming, and resends from the broker's expected sequence number after a gap. The broker's
de-duplication makes every resend safe.

If the broker says it expects a sequence number the publisher has already seen acknowledged, the
broker lost acknowledged messages (a crash under --fsync=interval or never cut its log back).
They cannot be resent (the publisher no longer holds them): it logs how many, counts them in
`lost_by_broker`, and carries on under a new producer id, resending what it holds, so that the
stream continues instead of stalling on a gap that can never be filled.

    pub = Publisher("tcp://127.0.0.1:5555", "telemetry")
    await pub.start()
    await pub.publish(b'{"a":1}\\n{"a":2}', 2)
    await pub.flush(timeout=10)
    await pub.close()

Every client takes `curve=ClientKeys.load(server_key_file, client_key_file)` (broker.curve) to
connect to a broker that wants CURVE (--curve-secret-key); without an allowed key it gets nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from typing import NamedTuple

import orjson
import zmq
import zmq.asyncio

from common.names import valid_topic

from . import protocol as p
from .curve import ClientKeys

log = logging.getLogger("broker.client")

DEFAULT_WINDOW = 100_000  # unacknowledged messages a publisher holds before it waits
DEFAULT_WINDOW_BYTES = 16 << 20  # and unacknowledged bytes: a bound on memory whatever the message size
ACK_TIMEOUT_S = 2.0  # resend what is unacknowledged after this long
MAX_RESEND_INTERVAL_S = 30.0


def _dealer(context: zmq.asyncio.Context, url: str, curve: ClientKeys | None = None, **options: int) -> zmq.asyncio.Socket:
    """A DEALER connected to the broker (a CURVE client with `curve`), reconnecting quickly after an outage."""
    sock = context.socket(zmq.DEALER)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(url)
    return sock


class _Client:
    """What every client shares: one DEALER to the broker, on a context of its own unless given one."""

    def __init__(self, url: str, context: zmq.asyncio.Context | None, curve: ClientKeys | None = None):
        self.url = url
        self.curve = curve
        self._ctx = context
        self._own_ctx = context is None
        self._sock: zmq.asyncio.Socket | None = None

    def _connect(self, **options: int) -> zmq.asyncio.Socket:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        self._sock = _dealer(self._ctx, self.url, self.curve, **options)
        return self._sock

    async def _disconnect(self, farewell: list[bytes] | None = None, linger: int | None = None) -> None:
        """Send `farewell` if it can go at once, close the socket (with `linger` ms, or the socket's
        own LINGER), and the context if it is this client's own."""
        if self._sock is not None:
            if farewell is not None:
                try:
                    await self._sock.send_multipart(farewell, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._sock.close(linger=linger)
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None


class _Batch:
    __slots__ = ("first_seq", "count", "body", "sent_at")

    def __init__(self, first_seq: int, count: int, body: bytes, sent_at: float):
        self.first_seq = first_seq
        self.count = count
        self.body = body
        self.sent_at = sent_at


class Publisher(_Client):
    def __init__(
        self,
        url: str,
        topic: str,
        *,
        window: int = DEFAULT_WINDOW,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        ack_timeout: float = ACK_TIMEOUT_S,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ):
        if not valid_topic(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        super().__init__(url, context, curve)
        self.topic = topic
        self.window = window
        self.window_bytes = window_bytes
        self.ack_timeout = ack_timeout
        self.producer_id = os.urandom(p.PRODUCER_ID_BYTES)
        self.published = 0  # messages the broker acknowledged
        self.rejected = 0  # messages the broker refused as invalid (never resent)
        self.resends = 0  # batches sent again
        self.lost_by_broker = 0  # acknowledged messages the broker later no longer had
        self.on_acknowledged = None  # called (no arguments) whenever acknowledgments arrive: a moment the owner is awake anyway
        self._topic = topic.encode()
        self._next_seq = 0
        self._inflight: deque[_Batch] = deque()
        self._inflight_messages = 0
        self._inflight_bytes = 0
        self._changed = asyncio.Event()  # set whenever acknowledgments free room
        self._tasks: list[asyncio.Task] = []
        self._resend_interval = ack_timeout
        # the overdue check: a timer armed while anything is in flight, for when the oldest batch
        # falls due (an idle publisher has no timer, a slow one no wake-up but its ack's)
        self._overdue: asyncio.TimerHandle | None = None
        self._resending: asyncio.Task | None = None
        self._last_gap: tuple[int, float] = (-1, 0.0)

    @property
    def unacked(self) -> int:
        return self._inflight_messages

    async def start(self) -> None:
        self._connect(LINGER=0, SNDHWM=1000, RCVHWM=10_000)
        self._tasks = [asyncio.create_task(self._receive_acks())]

    # -- the hot path --------------------------------------------------------------------------

    async def publish(self, body: bytes, count: int) -> None:
        """Send `count` newline-joined messages as one batch; waits while the window is full."""
        while self._inflight and (self._inflight_messages + count > self.window or self._inflight_bytes + len(body) > self.window_bytes):
            self._changed.clear()
            await self._changed.wait()
        batch = _Batch(self._next_seq, count, body, time.monotonic())
        self._next_seq += count
        if not self._inflight and self._overdue is None:
            self._check_overdue_in(self._resend_interval)
        self._inflight.append(batch)
        self._inflight_messages += count
        self._inflight_bytes += len(body)
        # copied into ZeroMQ, not lent: a lent buffer is released by pyzmq's garbage-collector
        # thread, one GIL hand-over per batch, which fell behind in a busy worker (docs/DESIGN.md)
        await self._sock.send_multipart(p.publish_frames(self._topic, self.producer_id, batch.first_seq, count, body))

    async def report(self, counters: dict) -> None:
        """Tell the broker this producer's own cumulative counters (shown in its stats)."""
        await self._sock.send_multipart(p.report_frames(self._topic, self.producer_id, orjson.dumps(counters)))

    # -- acknowledgments -----------------------------------------------------------------------

    async def _receive_acks(self) -> None:
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 3 or frames[0] != p.SIGNATURE:
                continue
            if frames[1] == p.ACK and len(frames[2]) == p.ACK_BODY.size:
                producer, first_seq, count, _offset = p.ACK_BODY.unpack(frames[2])
                if producer == self.producer_id:  # not a late answer to this publisher's previous id
                    self._acknowledged(first_seq + count)
            elif frames[1] == p.NACK and len(frames) >= 5 and len(frames[2]) == p.NACK_BODY.size:
                producer, first_seq, count, expected = p.NACK_BODY.unpack(frames[2])
                if producer == self.producer_id:
                    await self._refused(first_seq, count, expected, frames[3], frames[4].decode(errors="replace"))

    def _acknowledged(self, end_seq: int) -> None:
        """Everything before `end_seq` is in the broker (it accepts in sequence order only)."""
        inflight = self._inflight
        freed = 0
        while inflight and inflight[0].first_seq + inflight[0].count <= end_seq:
            batch = inflight.popleft()
            freed += batch.count
            self._inflight_bytes -= len(batch.body)
        if freed:
            self.published += freed
            self._inflight_messages -= freed
            backed_off, self._resend_interval = self._resend_interval != self.ack_timeout, self.ack_timeout
            if not inflight and self._overdue is not None:  # nothing left to be overdue
                self._overdue.cancel()
                self._overdue = None
            elif backed_off:  # acknowledged again after resends: the next check comes ack_timeout after the oldest send
                self._check_overdue_in(0)
            self._changed.set()
            if self.on_acknowledged is not None:
                self.on_acknowledged()

    async def _refused(self, first_seq: int, count: int, expected: int, code: bytes, reason: str) -> None:
        if code == p.NACK_SEQUENCE:
            acknowledged_up_to = self._inflight[0].first_seq if self._inflight else self._next_seq
            if expected < acknowledged_up_to:
                await self._renew(expected, acknowledged_up_to)
                return
            self._acknowledged(expected)
            # every batch behind a gap is refused the same way: resend once per gap, not per refusal
            now = time.monotonic()
            if self._inflight and (expected != self._last_gap[0] or now - self._last_gap[1] >= self.ack_timeout):
                self._last_gap = (expected, now)
                await self._resend(f"broker expects sequence {expected}")
        elif code == p.NACK_INVALID:
            dropped = [b for b in self._inflight if b.first_seq == first_seq]
            for batch in dropped:
                self._inflight.remove(batch)
                self._inflight_messages -= batch.count
                self._inflight_bytes -= len(batch.body)
                self.rejected += batch.count
            log.error("Broker refused %d messages as invalid (%s); they are not resent", count, reason)
            self._changed.set()
        # NACK_UNAVAILABLE: the batch stays in flight and is resent when overdue.

    def _check_overdue_in(self, delay: float) -> None:
        """(Re)arm the overdue check `delay` seconds from now."""
        if self._overdue is not None:
            self._overdue.cancel()
        self._overdue = asyncio.get_running_loop().call_later(delay, self._check_overdue)

    def _check_overdue(self) -> None:
        """The timer: resend if the oldest unacknowledged batch has waited `_resend_interval`,
        else look again when it will have (it may have been resent, or acknowledged, meanwhile)."""
        self._overdue = None
        if not self._inflight or (self._resending is not None and not self._resending.done()):
            return
        due_in = self._inflight[0].sent_at + self._resend_interval - time.monotonic()
        if due_in > 0:
            self._check_overdue_in(due_in)
        else:
            self._resending = asyncio.ensure_future(self._resend_overdue())

    async def _resend_overdue(self) -> None:
        try:
            await self._resend(f"no acknowledgment for {self._resend_interval:.1f} s")
        except Exception:  # (not a cancellation: close) the next check tries again
            log.warning("Resending to %s failed", self.url, exc_info=True)
        # exponential backoff with jitter, so that many producers do not resend in step
        self._resend_interval = min(self._resend_interval * 2, MAX_RESEND_INTERVAL_S) * random.uniform(0.8, 1.2)
        if self._inflight:
            self._check_overdue_in(self._resend_interval)

    async def _renew(self, expected: int, acknowledged_up_to: int) -> None:
        """The broker lost messages it had acknowledged: carry on as a new producer."""
        lost = acknowledged_up_to - expected
        self.lost_by_broker += lost
        old, self.producer_id = self.producer_id, os.urandom(p.PRODUCER_ID_BYTES)
        self._last_gap = (-1, 0.0)
        log.error(
            "The broker at %s lost %d messages it had acknowledged (sequence %d to %d of producer %s; its log was cut back, "
            "e.g. by a crash under --fsync=interval); continuing as producer %s",
            self.url,
            lost,
            expected,
            acknowledged_up_to - 1,
            old.hex(),
            self.producer_id.hex(),
        )
        if self._inflight:
            await self._resend("new producer id")

    async def _resend(self, why: str) -> None:
        """Send every unacknowledged batch again, in sequence order. The sends are queued all at
        once (no await in between), so that no new batch overtakes them: a broker meeting a new
        producer id starts it at the first sequence number it sees."""
        log.warning("Resending %d unacknowledged messages to %s (%s)", self._inflight_messages, self.url, why)
        now = time.monotonic()
        sends = []
        for batch in list(self._inflight):
            batch.sent_at = now
            self.resends += 1
            # lent, not copied: while the broker is away ZeroMQ queues every resend (up to SNDHWM),
            # and copies would pile up a window per resend; a lent body is the one the window holds
            # (the garbage-collector thread's cost per batch matters on the hot path, not here)
            frames = p.publish_frames(self._topic, self.producer_id, batch.first_seq, batch.count, batch.body)
            sends.append(self._sock.send_multipart(frames, copy=False))
        await asyncio.gather(*sends)

    # -- drain and close -----------------------------------------------------------------------

    async def flush(self, timeout: float) -> bool:
        """Wait until every sent message is acknowledged; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._inflight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return not self._inflight
        return True

    async def close(self) -> None:
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        tasks = [*self._tasks, *([self._resending] if self._resending is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._disconnect()


class Subscriber(_Client):
    """Receives a topic's messages in offset order: a replay from where you ask, then live.

        sub = Subscriber("tcp://127.0.0.1:5555", "telemetry", from_offset=0)
        await sub.start()
        async for offset, message in sub:   # message: the JSON bytes
            ...
        sub.missed                          # messages lost because this subscriber fell behind

    start: live (default), from_beginning=True, from_offset=N or from_time_ns=T. A subscriber
    that hears nothing for `resubscribe_s` subscribes again from the next offset it expects, so
    it carries on without a gap or a duplicate after a broker restart.
    """

    def __init__(
        self,
        url: str,
        topic: str,
        *,
        from_beginning: bool = False,
        from_offset: int | None = None,
        from_time_ns: int | None = None,
        resubscribe_s: float = 5.0,
        queue: int = 100,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ):
        if not valid_topic(topic):
            raise ValueError(f"invalid topic name {topic!r}")
        super().__init__(url, context, curve)
        self.topic = topic
        self.queue = queue  # batches the broker may send ahead of what this subscriber consumed (its credit)
        self._consumed = 0  # batches consumed since credit was last granted
        self.missed = 0
        self.next_offset: int | None = None  # the offset expected next, once anything arrived
        self.last_batch: tuple[bytes, int, int] = (b"", 0, 0)  # producer, first seq, received ns
        if from_offset is not None:
            self._start = (p.FROM_OFFSET, from_offset)
        elif from_time_ns is not None:
            self._start = (p.FROM_TIME, from_time_ns)
        else:
            self._start = (p.FROM_BEGINNING if from_beginning else p.FROM_LIVE, 0)
        self.resubscribe_s = resubscribe_s

    async def start(self) -> None:
        self._connect(LINGER=0, RCVHWM=1000)
        await self._subscribe()

    async def _subscribe(self) -> None:
        start, value = self._start if self.next_offset is None else (p.FROM_OFFSET, self.next_offset)
        self._consumed = 0
        await self._sock.send_multipart(p.subscribe_frames(self.topic.encode(), start, value, self.queue))

    async def batches(self):
        """(first offset, [message bytes]) as they arrive; messages before `next_offset` are skipped."""
        while True:
            if not await self._sock.poll(self.resubscribe_s * 1000):
                await self._subscribe()
                continue
            frames = await self._sock.recv_multipart()
            if len(frames) != 5 or frames[0] != p.SIGNATURE or frames[1] != p.DELIVER or len(frames[3]) != p.DELIVER_HEADER.size:
                continue
            self._consumed += 1  # grant credit back in steps of a quarter of the queue
            if self._consumed >= max(1, self.queue // 4):
                await self._sock.send_multipart(p.credit_frames(self.topic.encode(), self._consumed))
                self._consumed = 0
            first, count, missed, producer, first_seq, received = p.DELIVER_HEADER.unpack(frames[3])
            messages = frames[4].split(p.SEPARATOR)
            if self.next_offset is not None and first < self.next_offset:  # already seen (a resubscription overlap)
                skip = self.next_offset - first
                if skip >= count:
                    continue
                messages, first, first_seq = messages[skip:], self.next_offset, first_seq + skip
            self.missed += missed
            self.next_offset = first + len(messages)
            self.last_batch = (producer, first_seq, received)
            yield first, messages

    async def __aiter__(self):
        async for first, messages in self.batches():
            for i, message in enumerate(messages):
                yield first + i, message

    async def close(self) -> None:
        await self._disconnect([p.SIGNATURE, p.UNSUBSCRIBE, self.topic.encode()], linger=100)


class _Blocking:
    """Runs an async client (Subscriber or Consumer) on a private event loop, for code without asyncio."""

    def __init__(self, client):
        self._loop = asyncio.new_event_loop()
        self._client = client
        self._loop.run_until_complete(client.start())
        self._iter = client.__aiter__()

    def __iter__(self):
        return self

    def __next__(self):
        return self._loop.run_until_complete(self._iter.__anext__())

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BlockingSubscriber(_Blocking):
    """Subscriber for code without asyncio: `for offset, message in BlockingSubscriber(url, topic): ...`"""

    def __init__(self, url: str, topic: str, **options):
        super().__init__(Subscriber(url, topic, **options))

    @property
    def missed(self) -> int:
        return self._client.missed


class Message(NamedTuple):
    offset: int
    value: bytes  # the message's JSON bytes
    deliveries: int  # 1 the first time; more after an acknowledgment timed out
    producer: bytes
    seq: int
    received_ns: int


class Consumer(_Client):
    """A member of a consumer group: acknowledged, at-least-once consumption.

        consumer = Consumer("tcp://127.0.0.1:5555", "telemetry", "billing")
        await consumer.start()
        async for message in consumer:
            handle(message.value)
            await consumer.ack(message.offset)

    The broker hands this consumer up to `credit` unacknowledged messages; one it does not
    acknowledge within the broker's --ack-timeout is delivered again (perhaps to another member).
    """

    def __init__(
        self,
        url: str,
        topic: str,
        group: str,
        *,
        credit: int = 100,
        rejoin_s: float = 5.0,
        context: zmq.asyncio.Context | None = None,
        curve: ClientKeys | None = None,
    ):
        if not valid_topic(topic) or not valid_topic(group):
            raise ValueError(f"invalid topic or group name: {topic!r}, {group!r}")
        super().__init__(url, context, curve)
        self.topic = topic
        self.group = group
        self.credit = credit
        self.rejoin_s = rejoin_s
        self._names = (topic.encode(), group.encode())

    async def start(self) -> None:
        sock = self._connect(LINGER=1000)  # acknowledgments queued at close still go
        await sock.send_multipart(p.consume_frames(*self._names, self.credit))

    async def __aiter__(self):
        sock = self._sock
        while True:
            if not await sock.poll(self.rejoin_s * 1000):
                await sock.send_multipart(p.consume_frames(*self._names, self.credit))  # idle: join again
                continue
            frames = await sock.recv_multipart()
            if len(frames) == 6 and frames[0] == p.SIGNATURE and frames[1] == p.MESSAGE and len(frames[4]) == p.MSG_HEADER.size:
                offset, deliveries, producer, seq, received = p.MSG_HEADER.unpack(frames[4])
                yield Message(offset, frames[5], deliveries, producer, seq, received)

    async def ack(self, *offsets: int) -> None:
        if offsets:
            await self._sock.send_multipart(p.group_ack_frames(*self._names, list(offsets)))

    async def close(self) -> None:
        await self._disconnect([p.SIGNATURE, p.LEAVE, *self._names])


class BlockingConsumer(_Blocking):
    """Consumer for code without asyncio:

    with BlockingConsumer(url, "telemetry", "billing") as consumer:
        for message in consumer:
            handle(message.value)
            consumer.ack(message.offset)
    """

    def __init__(self, url: str, topic: str, group: str, **options):
        super().__init__(Consumer(url, topic, group, **options))

    def ack(self, *offsets: int) -> None:
        self._loop.run_until_complete(self._client.ack(*offsets))
