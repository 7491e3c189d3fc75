"""The broker: a ZeroMQ ROUTER that accepts producers' batches into topics and acknowledges them,
with its HTTP side (stats, health) in the same event loop.

Its life is a short story: `start()` binds both sockets, `serve` runs as tasks in the caller's
loop, `drain()` says that shutdown has begun (readiness turns 503, producers are still served so
they can flush), `close()` stops receiving and closes the sockets.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import orjson
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.names import valid_group, valid_topic

from . import host
from . import protocol as p
from .config import BrokerConfig
from .groups import Consumer, Delivery, Group
from .log import LogUnavailable, TopicLog
from .metrics import Metrics
from .topic import SequenceGap, Span, Subscriber, Topic

log = logging.getLogger("broker")

_BAD_FRAME_LOG_INTERVAL_S = 10.0
_REPLAY_RETRY_S = 0.01
_BURST = 64  # frames handled (and made durable together) before the loop lets other tasks run


ZMQ_SENT, ZMQ_AGAIN, ZMQ_GONE = range(3)
_CONNECTION_EVENTS = (
    zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


MAX_SILENT_REPORTS = 1024  # per topic: reports of producers that have not published


class BrokerStartError(Exception):
    """The broker cannot start (address in use, bad address); the message is one line for the user."""


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.topics: dict[str, Topic] = {}
        self.bad_frames: Counter = Counter()  # frames that are not the protocol, by reason
        self.connections: Counter = Counter()  # ZeroMQ connections: accepted, closed, handshake_failed, accept_failed
        self.started = time.monotonic()
        self.draining = False
        self.zmq_url = ""
        self.http_url = ""
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._readable = asyncio.Event()  # the ROUTER may have frames to read (see _receive)
        self._http = None
        self._tasks: list[asyncio.Task] = []
        self._logged_at: dict[str, float] = {}  # bounded-rate warnings, by kind
        self._monitor: zmq.asyncio.Socket | None = None
        self._ipc_dir: str | None = None
        # a burst's replies, sent once it is durable: [identity, topic, frames, ack]; an ACK is kept
        # as [producer, first seq, count, first offset] so that the next batch of the same producer
        # can join it (one ACK per producer per burst instead of one per batch)
        self._replies: list[list] = []
        self._last_reply: dict[bytes, list] = {}  # by identity, within the burst
        self._acked_in_burst = False
        self._fanout: list[tuple[Topic, Span]] = []  # delivered to live subscribers once the burst is durable
        self._replays: dict[bytes, asyncio.Task] = {}
        self._dlq_producer = os.urandom(p.PRODUCER_ID_BYTES)  # the broker's own id for dead letters
        self._dlq_seq = 0
        self.metrics = Metrics(self)
        self._sse_ids = itertools.count(1)
        # (topic, callable): the embedded streamer's workers, shown in /stats and /stats/<topic>
        self.workers_stats: tuple[str, object] | None = None

    # -- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ZeroMQ and HTTP (port 0 picks a free port) and start serving."""
        from .http import start_http  # aiohttp is only needed once a broker starts

        cfg = self.config
        host.raise_open_files_limit()
        host.keep_freed_memory()
        self._open_topics()
        # the ROUTER is a plain socket driven by the loop's reader callback (see _receive): no
        # future per frame; only the monitor, which is rare, is awaited through zmq.asyncio
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, p.frame_limit(cfg.max_message_bytes))  # larger: ZeroMQ drops the connection
        router.setsockopt(zmq.RCVHWM, 10_000)
        router.setsockopt(zmq.SNDHWM, 100_000)  # subscribers are bounded by their credit, not by this
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full or vanished peer is reported, not silently skipped
        address = f"tcp://{cfg.host}:{cfg.port or '*'}"
        try:
            router.bind(address)
        except zmq.ZMQError as exc:
            router.close()
            self._ctx.term()
            raise BrokerStartError(f"cannot listen for ZeroMQ on {cfg.host}:{cfg.port}: {exc.strerror}") from None
        self._router = router
        self.zmq_url = router.getsockopt_string(zmq.LAST_ENDPOINT)
        monitor_url = f"inproc://broker-monitor-{id(self)}"
        router.monitor(monitor_url, _CONNECTION_EVENTS)
        self._monitor = zmq.asyncio.Context.shadow(self._ctx).socket(zmq.PAIR)
        self._monitor.connect(monitor_url)
        try:
            self._http, self.http_url = await start_http(self, cfg.http_host, cfg.http_port)
        except OSError as exc:
            await self.close()
            raise BrokerStartError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: {exc.strerror or exc}") from None
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._sample_rates()),
            asyncio.create_task(self._expire_deliveries()),
            asyncio.create_task(self._watch_connections()),
        ]
        if cfg.persistence is not None and cfg.persistence.fsync == "interval":
            self._tasks.append(asyncio.create_task(self._sync_periodically()))
        log.info(
            "Broker listening: ZeroMQ %s, HTTP %s (stats at %s/stats/%s)",
            self.zmq_url,
            self.http_url,
            self.http_url,
            cfg.topics[0] if cfg.topics else "<topic>",
        )

    def local_endpoint(self) -> str:
        """An extra endpoint for producers on this machine: a Unix socket (ipc://), in Linux's
        abstract namespace (no file, so nothing is left behind even after kill -9; reachable by
        local processes, as the TCP port on 127.0.0.1 is), elsewhere in a private directory
        removed at close; the TCP endpoint where ipc:// is unavailable."""
        name = f"telemetry-broker-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            if sys.platform.startswith("linux"):
                url = f"ipc://@{name}"
            else:
                self._ipc_dir = tempfile.mkdtemp(prefix="telemetry-broker-")
                url = f"ipc://{self._ipc_dir}/zmq.sock"
            self._router.bind(url)
        except (OSError, zmq.ZMQError) as exc:
            log.debug("Broker: no ipc:// endpoint (%s); local producers use %s", exc, self.zmq_url)
            return self.zmq_url
        return url

    # -- serve ---------------------------------------------------------------------------------

    async def _receive(self) -> None:
        """Handle frames in bursts: whatever is already queued (up to _BURST), then make the
        burst durable as the fsync policy asks (one fsync for the whole burst) and reply.

        ZeroMQ's descriptor only says that the socket's state changed (edge-triggered), so after
        every wake-up the socket is read until it has nothing, and ZMQ_EVENTS is checked before
        sleeping again, as the ZeroMQ guide says."""
        router = self._router
        recv = router.recv_multipart
        observe = self.metrics.burst_seconds.observe
        loop = asyncio.get_running_loop()
        readable = self._readable
        loop.add_reader(router.FD, readable.set)
        try:
            while True:
                started = time.perf_counter()
                handled = 0
                while handled < _BURST:
                    try:
                        frames = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle_safely(frames)
                    handled += 1
                if handled:
                    self._commit()
                    if self._acked_in_burst:
                        observe(time.perf_counter() - started)
                        self._acked_in_burst = False
                if handled == _BURST:
                    await asyncio.sleep(0)  # a backlog must not starve HTTP and signal handling
                    continue
                readable.clear()
                if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    continue
                await readable.wait()
        finally:
            loop.remove_reader(router.FD)

    def _handle_safely(self, frames: list[bytes]) -> None:
        try:
            self._handle(frames)
        except Exception:  # a bug must not stop the broker serving everyone else
            log.exception("Broker: error while handling a frame; frame ignored")
            self._bad_frame("internal_error")

    def _commit(self) -> None:
        """fsync what the policy wants synced before replying, then send the burst's replies.
        An acknowledgment whose batch could not be synced becomes a NACK "unavailable": the
        producer resends, and the resend is acknowledged as a duplicate once the log is well."""
        replies, self._replies = self._replies, []
        self._last_reply.clear()
        failed: set[int] = set()
        for topic in {id(t): t for _, t, _, _ in replies if t is not None and t.log is not None}.values():
            if topic.log.fsync == "always" and topic.log.dirty:
                try:
                    with self.metrics.fsync_seconds.time():
                        topic.log.sync()
                except LogUnavailable:
                    failed.add(id(topic))
        for identity, topic, frames, ack in replies:
            if ack is not None:
                if id(topic) in failed:
                    frames = p.nack_frames(*ack[:3], p.NACK_UNAVAILABLE, f"log fsync failed: {topic.log.error}")
                else:
                    frames = p.ack_frames(*ack)
                    topic.acks += 1
            self._send(identity, frames)
        fanout, self._fanout = self._fanout, []
        for topic, span in fanout:
            if id(topic) not in failed:
                self._fan_out(topic, span)

    def _fan_out(self, topic: Topic, span: Span) -> None:
        """A durable span reaches the topic's live subscribers and its groups."""
        for sub in list(topic.subscribers.values()):
            if sub.live:
                self._deliver(topic, sub, span)
        for group in topic.groups.values():
            self._dispatch(topic, group)

    # -- consumer groups -----------------------------------------------------------------------

    def _group(self, topic_name: bytes, group_name: bytes, create: bool = True) -> tuple[Topic, Group] | None:
        topic = self._topic(topic_name)
        try:
            name = group_name.decode("ascii")
        except UnicodeDecodeError:
            return None
        if topic is None or not valid_group(name):
            return None
        group = topic.groups.get(name)
        if group is None and create:
            state_dir = os.path.join(topic.log.directory, "groups") if topic.log is not None else None
            group = topic.groups[name] = Group.load(name, state_dir, topic.first_offset)
            log.info("Broker: group %r of topic %r starts at offset %d", name, topic.name, group.committed)
        return None if group is None else (topic, group)

    def _consume(self, identity: bytes, topic_name: bytes, group_name: bytes, credit: int) -> None:
        found = self._group(topic_name, group_name)
        if found is None:
            self._bad_frame("bad_consume")
            return
        topic, group = found
        consumer = group.consumers.get(identity)
        if consumer is None:
            consumer = group.consumers[identity] = Consumer(identity, 0)
        consumer.credit = max(1, min(credit, self.config.subscriber_queue * 100))
        self._dispatch(topic, group)

    def _group_ack(self, topic_name: bytes, group_name: bytes, offsets: bytes) -> None:
        found = self._group(topic_name, group_name, create=False)
        if found is None:
            self._bad_frame("bad_group_ack")
            return
        topic, group = found
        for (offset,) in p.OFFSET.iter_unpack(offsets):
            group.acknowledge(offset)
        group.save()
        self._dispatch(topic, group)

    def _dispatch(self, topic: Topic, group: Group) -> None:
        """Hand out messages while a consumer has room: redeliveries first, then new ones."""
        now = time.monotonic()
        names = topic.name.encode(), group.name.encode()
        while (consumer := group.next_consumer()) is not None:
            if group.retry:
                delivery = group.retry.popleft()
            elif group.ahead or self._read_ahead(topic, group):
                delivery = group.ahead.popleft()
            else:
                return
            delivery.deliveries += 1
            sent = self._send(
                consumer.identity,
                p.message_frames(*names, delivery.offset, delivery.deliveries, delivery.producer, delivery.seq, delivery.received_ns, delivery.payload),
            )
            if sent != ZMQ_SENT:
                delivery.deliveries -= 1
                group.retry.appendleft(delivery)
                if sent == ZMQ_GONE:
                    group.remove_consumer(consumer.identity)
                    continue
                return
            delivery.consumer, delivery.deadline = consumer.identity, now + self.config.ack_timeout_s
            group.inflight[delivery.offset] = delivery
            consumer.holding += 1
            group.delivered += 1
            if delivery.deliveries > 1:
                group.redelivered += 1

    def _read_ahead(self, topic: Topic, group: Group) -> bool:
        """Load the next span the group has not handed out yet; False if there is none."""
        for span in topic.history(group.next_offset):
            if span.first_offset > group.next_offset:  # retention removed what the group never read
                if group.committed == group.next_offset and not group.inflight:
                    group.committed = span.first_offset
                group.next_offset = span.first_offset
            for i, message in enumerate(span.body.split(p.SEPARATOR)):
                group.ahead.append(Delivery(span.first_offset + i, message, span.producer, span.first_seq + i, span.received_ns))
            group.next_offset = span.first_offset + span.count
            return True
        return False

    async def _expire_deliveries(self) -> None:
        """Messages not acknowledged in time go back to their group, or to the dead-letter topic."""
        while True:
            await asyncio.sleep(min(0.2, self.config.ack_timeout_s / 4))
            now = time.monotonic()
            for topic in list(self.topics.values()):
                for group in list(topic.groups.values()):
                    expired = [d for d in group.inflight.values() if d.deadline <= now]
                    for delivery in expired:
                        del group.inflight[delivery.offset]
                        consumer = group.consumers.get(delivery.consumer)
                        if consumer is not None:
                            consumer.holding -= 1
                        if delivery.deliveries >= self.config.max_deliveries:
                            self._dead_letter(topic, group, delivery)
                        else:
                            group.retry.append(delivery)
                    if expired:
                        group.save()
                        self._dispatch(topic, group)

    def _dead_letter(self, topic: Topic, group: Group, delivery: Delivery) -> None:
        reason = f"not acknowledged within {self.config.ack_timeout_s:g} s, {delivery.deliveries} deliveries"
        head = orjson.dumps({"topic": topic.name, "group": group.name, "offset": delivery.offset, "deliveries": delivery.deliveries, "reason": reason})
        body = head[:-1] + b',"message":' + delivery.payload + b"}"  # the original bytes, unchanged
        dlq = self._topic(f"{topic.name}.dlq".encode()) if len(topic.name) <= 124 else None
        try:
            if dlq is None:
                raise LogUnavailable("the topic name is too long for a .dlq topic")
            span = dlq.append(self._dlq_producer, self._dlq_seq, 1, body)
        except LogUnavailable as exc:
            log.error("Broker: cannot dead-letter offset %d of %r (%s); it stays with group %r", delivery.offset, topic.name, exc, group.name)
            group.retry.append(delivery)
            return
        self._dlq_seq += 1
        group.dead_lettered += 1
        group.done(delivery.offset)
        if dlq.log is not None and dlq.log.fsync != "never":
            try:
                dlq.log.sync()
            except LogUnavailable:
                pass
        self._fan_out(dlq, span)

    # -- subscribers ---------------------------------------------------------------------------

    def _deliver(self, topic: Topic, sub: Subscriber, span: Span) -> bool:
        """Queue one span for a live subscriber; if its queue is full the span is dropped and
        counted (the producers never wait for a subscriber)."""
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
            sent = self._send(
                sub.key,
                p.deliver_frames(topic.name.encode(), span.first_offset, span.count, sub.missed, span.producer, span.first_seq, span.received_ns, span.body),
            )
        if sent == ZMQ_SENT:
            sub.delivered += span.count
            sub.missed = 0
            return True
        if sent == ZMQ_AGAIN:
            sub.dropped += span.count
            sub.missed += span.count
        else:
            self._unsubscribe(topic, sub.key)
        return False

    def _subscribe(self, identity: bytes, topic_name: bytes, start: int, value: int, credit: int) -> None:
        topic = self._topic(topic_name)
        if topic is None or start > p.FROM_TIME:
            self._bad_frame("bad_subscribe")
            return
        self._unsubscribe(topic, identity)  # subscribing again replaces the subscription
        sub = topic.subscribers[identity] = Subscriber(identity, "zmq", credit=min(credit, self.config.subscriber_queue), credit_granted=asyncio.Event())
        if start == p.FROM_LIVE:
            sub.live = True
            return
        from_offset = value if start == p.FROM_OFFSET else 0
        from_time = value if start == p.FROM_TIME else None
        self._replays[identity] = asyncio.create_task(self._replay(topic, sub, from_offset, from_time))

    def _credit(self, identity: bytes, topic_name: bytes, credit: int) -> None:
        topic = self._topic(topic_name)
        sub = topic.subscribers.get(identity) if topic is not None else None
        if sub is None:
            return  # e.g. after a broker restart: the subscriber subscribes again when it hears nothing
        sub.credit = min(sub.credit + credit, self.config.subscriber_queue)
        sub.credit_granted.set()

    def _unsubscribe(self, topic: Topic, key: object) -> None:
        sub = topic.subscribers.pop(key, None)
        task = self._replays.pop(key, None) if sub is not None else None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _replay(self, topic: Topic, sub: Subscriber, from_offset: int, from_time: int | None) -> None:
        """Send what the topic holds from the start asked for, waiting (not dropping) while the
        subscriber's queue is full; then, in the same step as the last check, go live."""
        cursor = from_offset
        name = topic.name.encode()
        try:
            while cursor < topic.next_offset:
                for span in topic.history(cursor, from_time):
                    while True:
                        sent = self._send(
                            sub.key, p.deliver_frames(name, span.first_offset, span.count, 0, span.producer, span.first_seq, span.received_ns, span.body)
                        )
                        if sent != ZMQ_AGAIN:
                            break
                        await asyncio.sleep(_REPLAY_RETRY_S)
                    if sent == ZMQ_GONE:
                        self._unsubscribe(topic, sub.key)
                        return
                    sub.delivered += span.count
                    cursor = span.first_offset + span.count
                    from_time = None  # the time only picks the first batch
                    await asyncio.sleep(0)
                if from_time is not None:  # nothing at or after that time yet
                    cursor = topic.next_offset
                elif cursor < topic.next_offset and not any(True for _ in topic.history(cursor)):
                    cursor = topic.next_offset  # the rest is no longer held (retention)
            sub.live = True
        finally:
            self._replays.pop(sub.key, None)

    def add_sse_subscriber(self, topic: Topic) -> Subscriber:
        key = f"sse-{next(self._sse_ids)}"
        sub = topic.subscribers[key] = Subscriber(key, "sse", live=True, queue=asyncio.Queue(self.config.subscriber_queue))
        return sub

    def remove_subscriber(self, topic: Topic, sub: Subscriber) -> None:
        self._unsubscribe(topic, sub.key)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[1] != p.SIGNATURE:
            self._bad_frame("not_protocol")
            return
        command = frames[2]
        if command == p.PUBLISH and len(frames) == 6:
            self._publish(frames[0], frames[3], frames[4], frames[5])
        elif command == p.REPORT and len(frames) == 6:
            self._report(frames[3], frames[4], frames[5])
        elif command == p.SUBSCRIBE and len(frames) == 5 and len(frames[4]) == p.SUB_HEADER.size:
            self._subscribe(frames[0], frames[3], *p.SUB_HEADER.unpack(frames[4]))
        elif command == p.CREDIT and len(frames) == 5 and len(frames[4]) == p.CREDIT_BODY.size:
            self._credit(frames[0], frames[3], p.CREDIT_BODY.unpack(frames[4])[0])
        elif command == p.CONSUME and len(frames) == 6 and len(frames[5]) == p.CREDIT_BODY.size:
            self._consume(frames[0], frames[3], frames[4], p.CREDIT_BODY.unpack(frames[5])[0])
        elif command == p.GROUP_ACK and len(frames) == 6 and len(frames[5]) % p.OFFSET.size == 0:
            self._group_ack(frames[3], frames[4], frames[5])
        elif command == p.LEAVE and len(frames) == 5:
            found = self._group(frames[3], frames[4], create=False)
            if found is not None:
                found[1].remove_consumer(frames[0])
                self._dispatch(*found)
        elif command == p.UNSUBSCRIBE and len(frames) == 4:
            topic = self._topic(frames[3])
            if topic is not None:
                self._unsubscribe(topic, frames[0])
        else:
            self._bad_frame("unknown_command")

    def _publish(self, identity: bytes, topic_name: bytes, header: bytes, body: bytes) -> None:
        if len(header) != p.PUB_HEADER.size:
            self._bad_frame("bad_header")
            return
        producer_id, first_seq, count = p.PUB_HEADER.unpack(header)
        topic = self._topic(topic_name)
        reason = None
        if topic is None:
            reason = "bad_topic"
        elif count < 1 or p.message_count(body) != count:
            reason = "count_mismatch"
        elif len(body) > self.config.max_message_bytes and max(map(len, body.split(p.SEPARATOR))) > self.config.max_message_bytes:
            reason = "message_too_large"
        if reason is not None:
            if topic is not None:
                topic.rejected[reason] += count
            self._bad_frame(reason)
            self._reply(identity, topic, p.nack_frames(producer_id, first_seq, count, p.NACK_INVALID, reason))
            return
        try:
            span = topic.append(producer_id, first_seq, count, body)
        except SequenceGap as gap:
            self._reply(identity, topic, p.nack_frames(producer_id, first_seq, count, p.NACK_SEQUENCE, "sequence gap", gap.expected))
        except LogUnavailable as exc:
            self._reply(identity, topic, p.nack_frames(producer_id, first_seq, count, p.NACK_UNAVAILABLE, f"log write failed: {exc}"))
        else:
            self._acked_in_burst = True
            if span.count and topic.subscribers:
                self._fanout.append((topic, span))
            last = self._last_reply.get(identity)
            ack = last[3] if last is not None and last[1] is topic else None
            if ack is not None and ack[0] == producer_id and ack[1] + ack[2] == first_seq and (ack[3] == p.DUPLICATE) == (span.first_offset == p.DUPLICATE):
                ack[2] += count  # the same producer's next batch: one ACK covers both
            else:
                self._reply(identity, topic, None, [producer_id, first_seq, count, span.first_offset])

    def _reply(self, identity: bytes, topic: Topic | None, frames: list[bytes] | None, ack: list | None = None) -> None:
        entry = [identity, topic, frames, ack]
        self._replies.append(entry)
        self._last_reply[identity] = entry

    def _report(self, topic_name: bytes, producer_id: bytes, report: bytes) -> None:
        topic = self._topic(topic_name)
        try:
            value = orjson.loads(report)
        except orjson.JSONDecodeError:
            value = None
        if topic is None or not isinstance(value, dict) or len(producer_id) != p.PRODUCER_ID_BYTES:
            self._bad_frame("bad_report")
            return
        producer = topic.producers.get(producer_id)
        if producer is not None:
            producer.report = value
            topic.silent_reports.pop(producer_id, None)
        else:  # it has not published (every row skipped, so far): its report still counts
            if producer_id not in topic.silent_reports and len(topic.silent_reports) >= MAX_SILENT_REPORTS:
                del topic.silent_reports[next(iter(topic.silent_reports))]
            topic.silent_reports[producer_id] = value

    def _topic(self, raw: bytes) -> Topic | None:
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        topic = self.topics.get(name)
        if topic is None and valid_topic(name):
            try:
                topic = self._create_topic(name)
            except OSError as exc:
                log.error("Broker: cannot create the log of topic %r: %s", name, exc.strerror or exc)
                return None
            log.info("Broker: new topic %r", name)
        return topic

    def _create_topic(self, name: str) -> Topic:
        persistence = self.config.persistence
        topic_log = None
        if persistence is not None:
            topic_log = TopicLog(
                os.path.join(persistence.directory, name),
                segment_bytes=persistence.segment_bytes,
                fsync=persistence.fsync,
                fsync_interval_s=persistence.fsync_interval_s,
                retention_bytes=persistence.retention_bytes,
                retention_age_s=persistence.retention_age_s,
            )
            topic_log.open()
            topic_log.background = self._in_thread
        topic = self.topics[name] = Topic(name, topic_log)
        return topic

    @staticmethod
    def _in_thread(work) -> None:
        """Blocking housekeeping of a log, run in the event loop's default executor."""
        asyncio.get_running_loop().run_in_executor(None, work)

    def _open_topics(self) -> None:
        """The configured topics, and every topic already in the persistence directory."""
        names = list(self.config.topics)
        persistence = self.config.persistence
        if persistence is not None:
            try:
                os.makedirs(persistence.directory, exist_ok=True)
                names += sorted(n for n in os.listdir(persistence.directory) if valid_topic(n) and os.path.isdir(os.path.join(persistence.directory, n)))
            except OSError as exc:
                raise BrokerStartError(f"cannot use persistence directory {persistence.directory}: {_directory_problem(persistence.directory, exc)}") from None
        for name in dict.fromkeys(names):
            try:
                self._create_topic(name)
            except OSError as exc:
                where = os.path.join(persistence.directory, name) if persistence else name
                raise BrokerStartError(f"cannot use persistence directory {where}: {_directory_problem(where, exc)}") from None

    def _send(self, identity: bytes, frames: list[bytes]) -> int:
        """Send without ever waiting: ZMQ_SENT, ZMQ_AGAIN (the peer's queue is full) or ZMQ_GONE.
        A reply lost this way is covered by the producer's retransmission."""
        router = self._router
        try:
            router.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
            return ZMQ_SENT
        except zmq.Again:
            return ZMQ_AGAIN
        except zmq.ZMQError:
            return ZMQ_GONE
        finally:
            # any operation may consume the descriptor's signal for frames that arrived meanwhile
            # (it is edge-triggered): hand it on, or _receive would sleep with frames waiting
            if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._readable.set()

    def _bad_frame(self, reason: str) -> None:
        self.bad_frames[reason] += 1
        if self._may_log(f"frame:{reason}"):
            log.warning("Broker: ignored a bad frame (%s); %d so far", reason, self.bad_frames[reason])

    def _may_log(self, kind: str) -> bool:
        """At most one warning of a kind per _BAD_FRAME_LOG_INTERVAL_S: garbage cannot flood the log."""
        now = time.monotonic()
        if now - self._logged_at.get(kind, -1e9) < _BAD_FRAME_LOG_INTERVAL_S:
            return False
        self._logged_at[kind] = now
        return True

    async def _watch_connections(self) -> None:
        """Count the ZeroMQ port's connections (libzmq's socket monitor). A peer that fails the
        ZMTP handshake (not ZeroMQ at all) or sends a frame over the size cap is disconnected by
        libzmq before any frame reaches the broker; it shows here."""
        names = {
            zmq.EVENT_ACCEPTED: "accepted",
            zmq.EVENT_DISCONNECTED: "closed",
            zmq.EVENT_ACCEPT_FAILED: "accept_failed",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
        }
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            name = names.get(event["event"])
            if name is None:
                continue
            self.connections[name] += 1
            if name == "accept_failed" and self._may_log(name):
                log.warning("Broker: cannot accept a connection (%s); %d so far", os.strerror(event["value"]), self.connections[name])
            elif name == "handshake_failed" and self._may_log(name):
                log.warning("Broker: a peer that does not speak ZeroMQ was disconnected; %d so far", self.connections[name])

    def connection_stats(self) -> dict:
        c = self.connections
        return {
            "open": c["accepted"] - c["closed"],
            "accepted": c["accepted"],
            "closed": c["closed"],
            "handshake_failed": c["handshake_failed"],
            "accept_failed": c["accept_failed"],
        }

    async def _sync_periodically(self) -> None:
        """--fsync=interval: fsync each written log at most every interval, off the event loop
        (a duplicate descriptor, so that a segment roll may close the original meanwhile)."""
        interval = self.config.persistence.fsync_interval_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(interval, 0.1))
            for topic in list(self.topics.values()):
                topic_log = topic.log
                if topic_log is None or not topic_log.sync_due():
                    continue
                fd = os.dup(topic_log.active.fd)
                topic_log.dirty = False
                try:
                    with self.metrics.fsync_seconds.time():
                        await loop.run_in_executor(None, os.fdatasync, fd)
                    topic_log.last_fsync = time.monotonic()
                except OSError as exc:
                    topic_log.dirty = True
                    log.error("Log %s: fsync failed: %s", topic_log.directory, exc.strerror)
                finally:
                    os.close(fd)

    async def _sample_rates(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for topic in list(self.topics.values()):
                topic.sample_rate(now)

    # -- stats ---------------------------------------------------------------------------------

    def topic_stats(self, name: str) -> dict | None:
        topic = self.topics.get(name)
        if topic is None:
            return None
        stats = topic.stats(self.started)
        if self.workers_stats is not None and self.workers_stats[0] == name:
            stats["workers"] = self.workers_stats[1]()
        return stats

    @property
    def healthy(self) -> bool:
        """Serving, and every log takes writes."""
        return all(t.log is None or t.log.error is None for t in self.topics.values())

    def stats(self) -> dict:
        return {
            "topics": {name: topic.stats(self.started) for name, topic in self.topics.items()},
            "bad_frames": dict(self.bad_frames),
            "connections": self.connection_stats(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            **({"workers": self.workers_stats[1]()} if self.workers_stats is not None else {}),
        }

    # -- drain and close -----------------------------------------------------------------------

    def drain(self) -> None:
        """Shutdown has begun: readiness fails from now on, but producers are still served."""
        self.draining = True

    async def close(self) -> None:
        """Stop receiving, close the HTTP server and the ZeroMQ socket."""
        tasks = [*self._tasks, *self._replays.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._monitor is not None:
            self._router.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None
        for topic in self.topics.values():
            for group in topic.groups.values():
                group.save(force=True)
            if topic.log is not None:
                topic.log.close()


def _directory_problem(path: str, exc: OSError) -> str:
    """The real reason a directory cannot be made or used: the first existing part of the path
    that is not a directory or not writable, rather than a bare strerror about the whole path."""
    probe = os.path.abspath(path)
    while probe and not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.lexists(probe) and not os.path.isdir(probe):
        return f"{probe} exists and is not a directory"
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user (uid {os.getuid()})"
    reason = exc.strerror or str(exc)
    if exc.filename and os.path.abspath(exc.filename) != os.path.abspath(path):
        return f"{exc.filename}: {reason}"
    return reason
